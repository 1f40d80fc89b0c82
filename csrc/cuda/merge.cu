// Weighted multi-checkpoint averaging on the GPU: out = sum_i w_i * x_i.
//
// One launch for any number of inputs (up to kMaxInputs): the input addresses,
// dtypes and weights travel by value in the kernel parameters (CUDA >= 12.1 allows
// 32 KiB of parameters on sm_70+), so no device-side table has to be allocated.
// Each thread keeps kItems fp32 accumulators in registers and touches elements
// blockDim apart, so every warp load is coalesced; each input is read once and the
// output written once, in its own dtype (round to nearest even).
//
// The file needs no torch headers: `mba_merge_into_cuda` is a plain C ABI, and the
// pybind11 binding below is compiled only when pybind11 is on the include path
// (as it is in the torch CUDAExtension build, see setup.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mba_cuda {

constexpr int kMaxInputs = 1024;
constexpr int kThreads = 256;
constexpr int kItems = 4;  // elements per thread per tile: independent loads in flight

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct MergeArgs {
  const void* ptrs[kMaxInputs];
  float weights[kMaxInputs];
  int8_t dtypes[kMaxInputs];
  int count;
};

__device__ __forceinline__ float load_as_f32(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case kF16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_from_f32(void* base, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kBF16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
    case kF16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

// No pointer here is __restrict__. The merge contract (megablocks_ablate/merge/
// kernels.py) lets `out` alias an input -- an in-place merge into one of the
// inputs' own buffers -- and the same input may be passed twice, so neither `out`
// nor the inputs can promise that nothing else touches their memory. __restrict__
// on `out` would make an in-place merge undefined behaviour, and would let the
// compiler treat the inputs as read-only for the whole kernel (non-coherent LDG.NC
// loads, or loads of a later tile moved above this tile's stores). Aliasing is safe
// as written: element i is read from every input, then written, by one thread only.
__global__ void __launch_bounds__(kThreads)
merge_kernel(void* out, int out_dtype, int64_t n, const __grid_constant__ MergeArgs args) {
  const int64_t tile = static_cast<int64_t>(kThreads) * kItems;
  for (int64_t start = static_cast<int64_t>(blockIdx.x) * tile; start < n;
       start += static_cast<int64_t>(gridDim.x) * tile) {
    float acc[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) acc[j] = 0.0f;
    for (int k = 0; k < args.count; ++k) {
      const void* x = args.ptrs[k];
      const int dtype = args.dtypes[k];  // uniform across the block: no divergence
      const float w = args.weights[k];
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t i = start + j * kThreads + threadIdx.x;
        if (i < n) acc[j] = k == 0 ? __fmul_rn(w, load_as_f32(x, dtype, i))
                                   : __fadd_rn(acc[j], __fmul_rn(w, load_as_f32(x, dtype, i)));
      }
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = start + j * kThreads + threadIdx.x;
      if (i < n) store_from_f32(out, out_dtype, i, acc[j]);
    }
  }
}

}  // namespace mba_cuda

// C ABI: returns 0 on success, -1 for bad arguments, else a cudaError_t code.
// `in_ptrs` / `in_dtypes` / `weights` are host arrays of `count` entries; `stream`
// is a cudaStream_t (0 for the default stream).
extern "C" int mba_merge_into_cuda(void* out, int out_dtype, const void* const* in_ptrs,
                                   const int* in_dtypes, const float* weights, int count,
                                   int64_t n, void* stream) {
  using namespace mba_cuda;
  if (count < 1 || count > kMaxInputs || n < 0 || out_dtype < kF32 || out_dtype > kF16) return -1;
  if (n == 0) return 0;
  MergeArgs args;
  args.count = count;
  for (int k = 0; k < count; ++k) {
    if (in_dtypes[k] < kF32 || in_dtypes[k] > kF16) return -1;
    args.ptrs[k] = in_ptrs[k];
    args.weights[k] = weights[k];
    args.dtypes[k] = static_cast<int8_t>(in_dtypes[k]);
  }
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t tile = static_cast<int64_t>(kThreads) * kItems;
  int64_t blocks = (n + tile - 1) / tile;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 80) * 16;  // enough to fill the GPU
  if (blocks > cap) blocks = cap;
  merge_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, out_dtype, n, args);
  return static_cast<int>(cudaGetLastError());
}

#if __has_include(<pybind11/pybind11.h>)
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace mba_cuda {

void register_merge_cuda(pybind11::module_& m) {
  m.def(
      "merge_into",
      [](uintptr_t out, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
         const std::vector<int>& in_dtypes, const std::vector<float>& weights, int64_t n,
         uintptr_t stream) {
        if (in_dtypes.size() != in_ptrs.size() || weights.size() != in_ptrs.size())
          throw std::invalid_argument("merge_into: in_ptrs, in_dtypes and weights differ in length");
        std::vector<const void*> ptrs(in_ptrs.size());
        for (size_t k = 0; k < in_ptrs.size(); ++k) ptrs[k] = reinterpret_cast<const void*>(in_ptrs[k]);
        int rc = mba_merge_into_cuda(reinterpret_cast<void*>(out), out_dtype, ptrs.data(),
                                     in_dtypes.data(), weights.data(),
                                     static_cast<int>(in_ptrs.size()), n,
                                     reinterpret_cast<void*>(stream));
        if (rc == -1)
          throw std::invalid_argument("merge_into: bad arguments (1.." + std::to_string(kMaxInputs) +
                                      " inputs, dtype codes 0 fp32 / 1 bf16 / 2 fp16)");
        if (rc != 0)
          throw std::runtime_error(std::string("merge_into: CUDA error: ") +
                                   cudaGetErrorString(static_cast<cudaError_t>(rc)));
      },
      pybind11::arg("out_ptr"), pybind11::arg("out_dtype"), pybind11::arg("in_ptrs"),
      pybind11::arg("in_dtypes"), pybind11::arg("weights"), pybind11::arg("n"),
      pybind11::arg("stream") = 0,
      "out[:n] = sum_i weights[i] * in_i[:n] on the GPU (fp32 accumulation), on `stream`.");
  m.attr("merge_max_inputs") = kMaxInputs;
}

}  // namespace mba_cuda
#endif
