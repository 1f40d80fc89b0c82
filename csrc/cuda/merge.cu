// Weighted multi-checkpoint averaging on the GPU: out = sum_i w_i * x_i.
//
// One launch for any number of inputs (up to kMaxInputs): the input addresses,
// dtypes and weights travel by value in the kernel parameters (CUDA >= 12.1 allows
// 32 KiB of parameters on sm_70+), so no device-side table has to be allocated.
// Each thread keeps fp32 accumulators in registers; each input is read once and the
// output written once, in its own dtype (round to nearest even).
//
// Two kernels compute the same fold in the same order (bitwise equal results):
// * merge_kernel (element-wise): a thread touches kItems elements blockDim apart, so
//   every warp load is coalesced, but a bf16 input is read 2 bytes per load.
// * merge_kernel_vec (16-byte vector loads), used when the output and every input
//   are 16-byte aligned and `vector_loads` is set (MBA_MERGE_VEC=auto, read in
//   megablocks_ablate/kernels/merge_switch.py): a thread reads kVec = 8 consecutive
//   elements per vector (one 16-byte load of bf16/fp16, two of fp32) and writes them
//   the same way; the last n % kVec elements are done element-wise by the first block.
//
// The file needs no torch headers: `mba_merge_into_cuda` is a plain C ABI, and the
// pybind11 binding below is compiled only when pybind11 is on the include path
// (as it is in the torch CUDAExtension build, see setup.py). The kernel bodies are
// __host__ __device__ so that, compiled with -DMBA_MERGE_HOST_EMULATION, the same
// code runs on the CPU one thread at a time (tests/kernels/test_merge_vector_loads.py:
// the index and tail arithmetic is checked without a GPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mba_cuda {

constexpr int kMaxInputs = 1024;
constexpr int kThreads = 256;
constexpr int kItems = 4;      // element-wise: elements per thread per tile
constexpr int kVec = 8;        // vector path: consecutive elements per vector (16 bytes of bf16)
constexpr int kVecItems = 2;   // vector path: vectors per thread per tile (loads in flight)
constexpr uintptr_t kAlign = 16;

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct MergeArgs {
  const void* ptrs[kMaxInputs];
  float weights[kMaxInputs];
  int8_t dtypes[kMaxInputs];
  int count;
};

// Where one (emulated or real) thread sits in the launch.
struct Lane {
  int64_t block, blocks;
  int thread;
};

#define MBA_HD __host__ __device__ __forceinline__

// fp32 product and sum, each rounded to nearest and never contracted into an FMA, so
// that every path (and the CPU emulation, built with -ffp-contract=off) folds alike.
MBA_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MBA_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

MBA_HD float fold(float acc, float w, float x, bool first) {
  return first ? mul_rn(w, x) : add_rn(acc, mul_rn(w, x));
}

MBA_HD float to_f32(float x) { return x; }
MBA_HD float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
MBA_HD float to_f32(__half x) { return __half2float(x); }

template <typename T>
MBA_HD T from_f32(float v);
template <>
MBA_HD float from_f32<float>(float v) { return v; }
template <>
MBA_HD __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
MBA_HD __half from_f32<__half>(float v) { return __float2half_rn(v); }

MBA_HD float load_as_f32(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kBF16: return to_f32(static_cast<const __nv_bfloat16*>(base)[i]);
    case kF16: return to_f32(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

MBA_HD void store_from_f32(void* base, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kBF16: static_cast<__nv_bfloat16*>(base)[i] = from_f32<__nv_bfloat16>(v); break;
    case kF16: static_cast<__half*>(base)[i] = from_f32<__half>(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

// 16 bytes of T (8 bf16/fp16 or 4 fp32), read and written as one vector: the memory
// holds T elements and is accessed as T elements, so no type punning is involved.
template <typename T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};

// Elements kVec*v .. kVec*v + kVec-1 of a 16-byte-aligned buffer of T, as fp32.
template <typename T>
MBA_HD void load_vec(const void* base, int64_t v, float (&x)[kVec]) {
  constexpr int per = 16 / sizeof(T);
  constexpr int loads = kVec / per;
  const Vec16<T>* p = static_cast<const Vec16<T>*>(base) + v * loads;
#pragma unroll
  for (int l = 0; l < loads; ++l) {
    const Vec16<T> q = p[l];
#pragma unroll
    for (int e = 0; e < per; ++e) x[l * per + e] = to_f32(q.v[e]);
  }
}

template <typename T>
MBA_HD void store_vec_as(void* base, int64_t v, const float (&a)[kVec]) {
  constexpr int per = 16 / sizeof(T);
  constexpr int loads = kVec / per;
  Vec16<T>* p = static_cast<Vec16<T>*>(base) + v * loads;
#pragma unroll
  for (int l = 0; l < loads; ++l) {
    Vec16<T> q;
#pragma unroll
    for (int e = 0; e < per; ++e) q.v[e] = from_f32<T>(a[l * per + e]);
    p[l] = q;
  }
}

MBA_HD void store_vec(void* base, int dtype, int64_t v, const float (&a)[kVec]) {
  switch (dtype) {
    case kBF16: store_vec_as<__nv_bfloat16>(base, v, a); break;
    case kF16: store_vec_as<__half>(base, v, a); break;
    default: store_vec_as<float>(base, v, a);
  }
}

// One input's term for a thread's kVecItems vectors of the tile at `start` (in
// vectors): every load is issued before the first product.
template <typename T>
MBA_HD void fold_vec(float (&acc)[kVecItems][kVec], const void* x, float w, bool first,
                     int64_t start, int64_t nv, int thread) {
  float vals[kVecItems][kVec];
#pragma unroll
  for (int j = 0; j < kVecItems; ++j) {
    const int64_t v = start + j * kThreads + thread;
    if (v < nv) load_vec<T>(x, v, vals[j]);
  }
#pragma unroll
  for (int j = 0; j < kVecItems; ++j) {
    const int64_t v = start + j * kThreads + thread;
    if (v < nv) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[j][e] = fold(acc[j][e], w, vals[j][e], first);
    }
  }
}

// Element i of the sum, element-wise (the scalar kernel and the vector kernel's tail).
MBA_HD float sum_at(const MergeArgs& args, int64_t i) {
  float acc = 0.0f;
  for (int k = 0; k < args.count; ++k)
    acc = fold(acc, args.weights[k], load_as_f32(args.ptrs[k], args.dtypes[k], i), k == 0);
  return acc;
}

// No pointer here is __restrict__. The merge contract (megablocks_ablate/merge/
// kernels.py) lets `out` alias an input -- an in-place merge into one of the
// inputs' own buffers -- and the same input may be passed twice, so neither `out`
// nor the inputs can promise that nothing else touches their memory. __restrict__
// on `out` would make an in-place merge undefined behaviour, and would let the
// compiler treat the inputs as read-only for the whole kernel (non-coherent LDG.NC
// loads, or loads of a later tile moved above this tile's stores). Aliasing is safe
// as written: element i is read from every input, then written, by one thread only
// (in the vector kernel, the kVec elements of a vector are all read, then written,
// by one thread).
MBA_HD void merge_elementwise(void* out, int out_dtype, int64_t n, const MergeArgs& args,
                              Lane lane) {
  const int64_t tile = static_cast<int64_t>(kThreads) * kItems;
  for (int64_t start = lane.block * tile; start < n; start += lane.blocks * tile) {
    float acc[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) acc[j] = 0.0f;
    for (int k = 0; k < args.count; ++k) {
      const void* x = args.ptrs[k];
      const int dtype = args.dtypes[k];  // uniform across the block: no divergence
      const float w = args.weights[k];
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t i = start + j * kThreads + lane.thread;
        if (i < n) acc[j] = fold(acc[j], w, load_as_f32(x, dtype, i), k == 0);
      }
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = start + j * kThreads + lane.thread;
      if (i < n) store_from_f32(out, out_dtype, i, acc[j]);
    }
  }
}

// Needs `out` and every input 16-byte aligned (checked by the host, use_vector()).
MBA_HD void merge_vectorized(void* out, int out_dtype, int64_t n, const MergeArgs& args,
                             Lane lane) {
  const int64_t nv = n / kVec;  // whole vectors; elements past nv * kVec: the tail below
  const int64_t tile = static_cast<int64_t>(kThreads) * kVecItems;
  for (int64_t start = lane.block * tile; start < nv; start += lane.blocks * tile) {
    float acc[kVecItems][kVec];
    for (int k = 0; k < args.count; ++k) {
      const void* x = args.ptrs[k];
      const float w = args.weights[k];
      switch (args.dtypes[k]) {  // uniform across the block: no divergence
        case kBF16: fold_vec<__nv_bfloat16>(acc, x, w, k == 0, start, nv, lane.thread); break;
        case kF16: fold_vec<__half>(acc, x, w, k == 0, start, nv, lane.thread); break;
        default: fold_vec<float>(acc, x, w, k == 0, start, nv, lane.thread);
      }
    }
#pragma unroll
    for (int j = 0; j < kVecItems; ++j) {
      const int64_t v = start + j * kThreads + lane.thread;
      if (v < nv) store_vec(out, out_dtype, v, acc[j]);
    }
  }
  if (lane.block == 0) {  // the last n % kVec (< kThreads) elements, element-wise
    const int64_t i = nv * kVec + lane.thread;
    if (i < n) store_from_f32(out, out_dtype, i, sum_at(args, i));
  }
}

__global__ void __launch_bounds__(kThreads)
merge_kernel(void* out, int out_dtype, int64_t n, const __grid_constant__ MergeArgs args) {
  merge_elementwise(out, out_dtype, n, args,
                    Lane{blockIdx.x, gridDim.x, static_cast<int>(threadIdx.x)});
}

__global__ void __launch_bounds__(kThreads)
merge_kernel_vec(void* out, int out_dtype, int64_t n, const __grid_constant__ MergeArgs args) {
  merge_vectorized(out, out_dtype, n, args,
                   Lane{blockIdx.x, gridDim.x, static_cast<int>(threadIdx.x)});
}

// ---------------------------------------------------------------- host side

// Checks the arguments and fills `args`; false for bad arguments.
inline bool fill_args(MergeArgs& args, int out_dtype, const void* const* in_ptrs,
                      const int* in_dtypes, const float* weights, int count, int64_t n) {
  if (count < 1 || count > kMaxInputs || n < 0 || out_dtype < kF32 || out_dtype > kF16)
    return false;
  args.count = count;
  for (int k = 0; k < count; ++k) {
    if (in_dtypes[k] < kF32 || in_dtypes[k] > kF16) return false;
    args.ptrs[k] = in_ptrs[k];
    args.weights[k] = weights[k];
    args.dtypes[k] = static_cast<int8_t>(in_dtypes[k]);
  }
  return true;
}

// The vector kernel only when allowed and the output and every input are 16-byte aligned.
inline bool use_vector(int vector_loads, const void* out, const MergeArgs& args) {
  if (!vector_loads || reinterpret_cast<uintptr_t>(out) % kAlign != 0) return false;
  for (int k = 0; k < args.count; ++k)
    if (reinterpret_cast<uintptr_t>(args.ptrs[k]) % kAlign != 0) return false;
  return true;
}

// Blocks for a launch over n elements (at least one), at most `cap`.
inline int64_t grid_blocks(bool vec, int64_t n, int64_t cap) {
  const int64_t units = vec ? n / kVec : n;  // vectors or elements
  const int64_t tile = static_cast<int64_t>(kThreads) * (vec ? kVecItems : kItems);
  int64_t blocks = (units + tile - 1) / tile;
  if (blocks < 1) blocks = 1;  // the vector kernel's tail when n < kVec
  return blocks > cap ? cap : blocks;
}

}  // namespace mba_cuda

// C ABI: returns 0 on success, -1 for bad arguments, else a cudaError_t code.
// `in_ptrs` / `in_dtypes` / `weights` are host arrays of `count` entries; `stream`
// is a cudaStream_t (0 for the default stream); `vector_loads`: 1 lets the kernel use
// 16-byte vector loads where every pointer is 16-byte aligned, 0 never.
extern "C" int mba_merge_into_cuda_v(void* out, int out_dtype, const void* const* in_ptrs,
                                     const int* in_dtypes, const float* weights, int count,
                                     int64_t n, void* stream, int vector_loads) {
  using namespace mba_cuda;
  MergeArgs args;
  if (!fill_args(args, out_dtype, in_ptrs, in_dtypes, weights, count, n)) return -1;
  if (n == 0) return 0;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 80) * 16;  // enough to fill the GPU
  const bool vec = use_vector(vector_loads, out, args);
  const unsigned blocks = static_cast<unsigned>(grid_blocks(vec, n, cap));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (vec)
    merge_kernel_vec<<<blocks, kThreads, 0, s>>>(out, out_dtype, n, args);
  else
    merge_kernel<<<blocks, kThreads, 0, s>>>(out, out_dtype, n, args);
  return static_cast<int>(cudaGetLastError());
}

// The same with vector loads allowed (the C ABI before `vector_loads` existed).
extern "C" int mba_merge_into_cuda(void* out, int out_dtype, const void* const* in_ptrs,
                                   const int* in_dtypes, const float* weights, int count,
                                   int64_t n, void* stream) {
  return mba_merge_into_cuda_v(out, out_dtype, in_ptrs, in_dtypes, weights, count, n, stream, 1);
}

#ifdef MBA_MERGE_HOST_EMULATION
#include <memory>

// The kernels' bodies run on the CPU, one (block, thread) after another, over host
// memory, for tests without a GPU: threads share nothing, so the order does not
// matter. `max_blocks` caps the grid (a small cap exercises the grid-stride loop).
// Returns -1 for bad arguments, else 1 when the vector kernel ran, 0 when the
// element-wise one did.
extern "C" int mba_merge_emulate(void* out, int out_dtype, const void* const* in_ptrs,
                                 const int* in_dtypes, const float* weights, int count,
                                 int64_t n, int vector_loads, int64_t max_blocks) {
  using namespace mba_cuda;
  auto args = std::make_unique<MergeArgs>();
  if (max_blocks < 1 || !fill_args(*args, out_dtype, in_ptrs, in_dtypes, weights, count, n))
    return -1;
  const bool vec = use_vector(vector_loads, out, *args);
  if (n == 0) return vec ? 1 : 0;
  const int64_t blocks = grid_blocks(vec, n, max_blocks);
  for (int64_t b = 0; b < blocks; ++b)
    for (int t = 0; t < kThreads; ++t) {
      const Lane lane{b, blocks, t};
      if (vec)
        merge_vectorized(out, out_dtype, n, *args, lane);
      else
        merge_elementwise(out, out_dtype, n, *args, lane);
    }
  return vec ? 1 : 0;
}
#endif

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
         uintptr_t stream, bool vector_loads) {
        if (in_dtypes.size() != in_ptrs.size() || weights.size() != in_ptrs.size())
          throw std::invalid_argument("merge_into: in_ptrs, in_dtypes and weights differ in length");
        std::vector<const void*> ptrs(in_ptrs.size());
        for (size_t k = 0; k < in_ptrs.size(); ++k) ptrs[k] = reinterpret_cast<const void*>(in_ptrs[k]);
        int rc = mba_merge_into_cuda_v(reinterpret_cast<void*>(out), out_dtype, ptrs.data(),
                                       in_dtypes.data(), weights.data(),
                                       static_cast<int>(in_ptrs.size()), n,
                                       reinterpret_cast<void*>(stream), vector_loads ? 1 : 0);
        if (rc == -1)
          throw std::invalid_argument("merge_into: bad arguments (1.." + std::to_string(kMaxInputs) +
                                      " inputs, dtype codes 0 fp32 / 1 bf16 / 2 fp16)");
        if (rc != 0)
          throw std::runtime_error(std::string("merge_into: CUDA error: ") +
                                   cudaGetErrorString(static_cast<cudaError_t>(rc)));
      },
      pybind11::arg("out_ptr"), pybind11::arg("out_dtype"), pybind11::arg("in_ptrs"),
      pybind11::arg("in_dtypes"), pybind11::arg("weights"), pybind11::arg("n"),
      pybind11::arg("stream") = 0, pybind11::arg("vector_loads") = true,
      "out[:n] = sum_i weights[i] * in_i[:n] on the GPU (fp32 accumulation), on `stream`; "
      "vector_loads: 16-byte loads where out and every input are 16-byte aligned.");
  m.attr("merge_max_inputs") = kMaxInputs;
  m.attr("merge_vector_loads") = true;  // merge_into takes `vector_loads`
}

}  // namespace mba_cuda
#endif
