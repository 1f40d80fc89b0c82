// Weighted multi-checkpoint averaging on CPU: out = sum_i w_i * x_i.
//
// Why this shape: merging unit models is pure memory traffic (N inputs read once,
// one output written once), so the kernel walks the parameters in blocks, folds the
// inputs into an L1-resident fp32 block accumulator up to 8 inputs per pass (enough
// streams in flight to saturate memory, few enough that inputs at the same page
// offset, as in N identically laid-out checkpoints, do not evict each other from
// L1), and writes each block once in the output dtype. Threads (OpenMP) own
// contiguous ranges of blocks; the per-element summation order is fixed (input 0,
// 1, ...), so the result does not depend on the thread count or the grouping, and
// `out` may alias an input (each block is read in full before it is written).
//
// The store of each block also ORs together a "not finite" bit per element (exponent
// all ones in the output dtype), so a streaming merge learns whether a chunk holds a
// NaN/inf (from an input, or from overflowing the output dtype) at no extra pass over
// memory; merge_into returns it.
//
// The extension has no torch headers (see setup.py): Python passes raw data
// pointers (tensor.data_ptr()), dtype codes and the length. bf16/fp16 <-> fp32
// conversions are written out by hand as branch-free bit manipulation so that the
// inner loops vectorise; rounding is round-to-nearest-even, NaN stays NaN.
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <pybind11/stl.h>

#include "registry.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// Round every product and every sum (never fuse them into an FMA, even under
// -march=native), so the kernel is bitwise equal to the PyTorch reference.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace mba {
namespace {

#define MBA_INLINE inline __attribute__((always_inline))

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Elements per block: 4096 fp32 accumulators = 16 KiB, resident in L1.
constexpr int64_t kBlock = 4096;

MBA_INLINE float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
MBA_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

MBA_INLINE float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

MBA_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  // Round to nearest even on the 16 dropped bits; a NaN becomes the canonical quiet NaN.
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
}

MBA_INLINE float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t em = h & 0x7FFFu;  // exponent + mantissa
  // Shift the fields into fp32 position and rebias by multiplying with 2^112: exact
  // for normals and subnormals alike (a half subnormal m*2^-24 is an fp32 subnormal
  // m*2^-136 here, scaled to a normal fp32).
  float mag = bits_to_f32(em << 13) * bits_to_f32(0x77800000u);  // 2^112
  uint32_t special = (em << 13) | 0x7F800000u;                  // inf / NaN payload
  uint32_t is_special = 0u - static_cast<uint32_t>(em >= 0x7C00u);  // all ones or zero
  uint32_t bits = (special & is_special) | (f32_to_bits(mag) & ~is_special);
  return bits_to_f32(bits | sign);
}

MBA_INLINE uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  // All three cases are computed and selected with masks so the loop vectorises.
  // |f| >= 65536 (or inf/NaN): inf, or a quiet NaN.
  uint32_t big = 0x7C00u | (static_cast<uint32_t>(u > 0x7F800000u) << 9);
  // Half subnormal (or zero): adding 0.5 aligns the mantissa so the FPU's own
  // round-to-nearest-even drops exactly the bits a half subnormal cannot hold.
  uint32_t sub = f32_to_bits(bits_to_f32(u) + 0.5f) - 0x3F000000u;
  // Normal: rebias ((15 - 127) << 23 == 0xC8000000 mod 2^32) and round to nearest
  // even on the 13 dropped bits.
  uint32_t norm = (u + 0xC8000FFFu + ((u >> 13) & 1u)) >> 13;
  uint32_t is_big = 0u - static_cast<uint32_t>(u >= 0x47800000u);
  uint32_t is_sub = 0u - static_cast<uint32_t>(u < 0x38800000u);
  uint32_t out = (big & is_big) | (sub & is_sub) | (norm & ~(is_big | is_sub));
  return static_cast<uint16_t>(out | sign);
}

// special(y): 1 when the stored value is NaN or +-inf (its exponent field all ones).
template <int D>
struct Elem;
template <>
struct Elem<kF32> {
  using T = float;
  MBA_INLINE static float load(T x) { return x; }
  MBA_INLINE static T store(float x) { return x; }
  MBA_INLINE static uint32_t special(T y) {
    return static_cast<uint32_t>((f32_to_bits(y) & 0x7F800000u) == 0x7F800000u);
  }
};
template <>
struct Elem<kBF16> {
  using T = uint16_t;
  MBA_INLINE static float load(T x) { return bf16_to_f32(x); }
  MBA_INLINE static T store(float x) { return f32_to_bf16(x); }
  MBA_INLINE static uint32_t special(T y) {
    return static_cast<uint32_t>((y & 0x7F80u) == 0x7F80u);
  }
};
template <>
struct Elem<kF16> {
  using T = uint16_t;
  MBA_INLINE static float load(T x) { return f16_to_f32(x); }
  MBA_INLINE static T store(float x) { return f32_to_f16(x); }
  MBA_INLINE static uint32_t special(T y) {
    return static_cast<uint32_t>((y & 0x7C00u) == 0x7C00u);
  }
};

// acc[j] (+)= w_0 * x_0[j] + ... + w_{K-1} * x_{K-1}[j] for K inputs of one dtype,
// added one at a time in input order: each product is rounded, then each sum (no FMA
// unless the build enables it), exactly as the PyTorch reference does. Reading K
// inputs per pass keeps K streams in flight while the accumulator stays in L1.
template <int D, int K, bool kFirst>
MBA_INLINE void accumulate(float* __restrict acc, const char* const* src, const float* w,
                           int64_t len) {
  using E = Elem<D>;
  const typename E::T* x[K];
  float wk[K];
  for (int q = 0; q < K; ++q) {
    x[q] = reinterpret_cast<const typename E::T*>(src[q]);
    wk[q] = w[q];
  }
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    float a = kFirst ? wk[0] * E::load(x[0][j]) : acc[j] + wk[0] * E::load(x[0][j]);
    for (int q = 1; q < K; ++q) a += wk[q] * E::load(x[q][j]);
    acc[j] = a;
  }
}

// Writes the block in the output dtype; returns 1 if any stored value is NaN/inf.
template <int D>
MBA_INLINE uint32_t store(char* dst, const float* __restrict acc, int64_t len) {
  using E = Elem<D>;
  typename E::T* __restrict y = reinterpret_cast<typename E::T*>(dst);
  uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < len; ++j) {
    const typename E::T v = E::store(acc[j]);
    y[j] = v;
    bad |= E::special(v);
  }
  return bad;
}

MBA_INLINE int64_t elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

// Consecutive inputs of one dtype, 1, 2, 4 or 8 of them, read in one pass.
struct Group {
  int dtype;
  int count;
  size_t first;  // index of its first input
};

struct Plan {
  std::vector<const char*> ptrs;
  std::vector<float> weights;
  std::vector<Group> groups;
  std::vector<int64_t> sizes;  // element size per input
};

template <int D>
MBA_INLINE void accumulate_group(float* acc, const Plan& p, const Group& g, int64_t start,
                                 int64_t len) {
  const char* src[8];
  for (int q = 0; q < g.count; ++q) src[q] = p.ptrs[g.first + q] + start * p.sizes[g.first + q];
  const float* w = &p.weights[g.first];
  const bool first = g.first == 0;
  switch (g.count * 2 + first) {
    case 2: accumulate<D, 1, false>(acc, src, w, len); break;
    case 3: accumulate<D, 1, true>(acc, src, w, len); break;
    case 4: accumulate<D, 2, false>(acc, src, w, len); break;
    case 5: accumulate<D, 2, true>(acc, src, w, len); break;
    case 8: accumulate<D, 4, false>(acc, src, w, len); break;
    case 9: accumulate<D, 4, true>(acc, src, w, len); break;
    case 16: accumulate<D, 8, false>(acc, src, w, len); break;
    default: accumulate<D, 8, true>(acc, src, w, len); break;
  }
}

// Blocks [b0, b1) of kBlock elements: fold every input group into the fp32 block
// accumulator (L1-resident), then write the block once in the output dtype. Returns
// 1 if any written value is NaN/inf.
// Compiled twice (baseline x86-64 and AVX2, chosen at load time by the CPU) so the
// conversions and sums use 256-bit vectors where available; FMA is deliberately not
// enabled, so results round the same on every CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
uint32_t merge_blocks(char* out, int out_dtype, const Plan& p, int64_t n, int64_t b0,
                      int64_t b1) {
  alignas(64) float acc[kBlock];
  uint32_t bad = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = start + kBlock <= n ? kBlock : n - start;
    for (const Group& g : p.groups) {
      switch (g.dtype) {
        case kF32: accumulate_group<kF32>(acc, p, g, start, len); break;
        case kBF16: accumulate_group<kBF16>(acc, p, g, start, len); break;
        default: accumulate_group<kF16>(acc, p, g, start, len); break;
      }
    }
    char* dst = out + start * elem_size(out_dtype);
    switch (out_dtype) {
      case kF32: bad |= store<kF32>(dst, acc, len); break;
      case kBF16: bad |= store<kBF16>(dst, acc, len); break;
      default: bad |= store<kF16>(dst, acc, len); break;
    }
  }
  return bad;
}

void check_dtype(int dtype) {
  if (dtype != kF32 && dtype != kBF16 && dtype != kF16)
    throw std::invalid_argument("merge_into: dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
}

// Returns whether every written value is finite.
bool merge_into(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                const std::vector<int>& in_dtypes, const std::vector<float>& weights,
                int64_t n, int num_threads) {
  const size_t k = in_ptrs.size();
  if (k == 0) throw std::invalid_argument("merge_into: needs at least one input");
  if (in_dtypes.size() != k || weights.size() != k)
    throw std::invalid_argument("merge_into: in_ptrs, in_dtypes and weights differ in length");
  if (n < 0) throw std::invalid_argument("merge_into: negative length");
  check_dtype(out_dtype);
  Plan plan;
  plan.weights = weights;
  for (size_t i = 0; i < k; ++i) {
    check_dtype(in_dtypes[i]);
    plan.ptrs.push_back(reinterpret_cast<const char*>(in_ptrs[i]));
    plan.sizes.push_back(elem_size(in_dtypes[i]));
  }
  // Split runs of equal dtype into groups of 8, 4, 2, 1 (input order is kept).
  for (size_t i = 0; i < k;) {
    size_t run = 1;
    while (i + run < k && in_dtypes[i + run] == in_dtypes[i] && run < 8) ++run;
    int count = run >= 8 ? 8 : run >= 4 ? 4 : run >= 2 ? 2 : 1;
    plan.groups.push_back({in_dtypes[i], count, i});
    i += count;
  }
  char* out = reinterpret_cast<char*>(out_ptr);
  if (n == 0) return true;

  pybind11::gil_scoped_release no_gil;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  if (num_threads > blocks) num_threads = static_cast<int>(blocks);
  // One thread needs no parallel region: a region costs a wake-up of the other
  // threads, which on a busy machine can take longer than a chunk of the merge.
  if (num_threads <= 1) return merge_blocks(out, out_dtype, plan, n, 0, blocks) == 0;
  uint32_t bad = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : bad)
  {
    // Each thread streams through one contiguous range of blocks.
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    bad |= merge_blocks(out, out_dtype, plan, n, blocks * id / nt, blocks * (id + 1) / nt);
  }
  return bad == 0;
#else
  (void)num_threads;
  return merge_blocks(out, out_dtype, plan, n, 0, blocks) == 0;
#endif
}

}  // namespace

void register_merge(pybind11::module_& m) {
  m.def("merge_into", &merge_into, pybind11::arg("out_ptr"), pybind11::arg("out_dtype"),
        pybind11::arg("in_ptrs"), pybind11::arg("in_dtypes"), pybind11::arg("weights"),
        pybind11::arg("n"), pybind11::arg("num_threads") = 0,
        "out[:n] = sum_i weights[i] * in_i[:n], accumulated in fp32 (OpenMP, GIL released).\n"
        "Pointers are raw addresses of contiguous buffers; dtype codes: 0 fp32, 1 bf16, 2 fp16.\n"
        "Returns whether every written value is finite (no NaN/inf in out[:n]).");
}

}  // namespace mba
