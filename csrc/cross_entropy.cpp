// One chunk of the fused output projection + cross-entropy on CPU, per row of fp32
// logits (megablocks_ablate/kernels/cross_entropy.py owns the chunking and the GEMMs):
//
//     z = scale * logits;   nll = logsumexp(z) - z[label]
//     grad: logits <- scale * (softmax(z) - onehot(label))     (0 for ignored rows)
//
// Why a kernel: on a small model the [rows, vocab] softmax is a quarter of a CPU
// training step and of an evaluation. PyTorch makes it in several passes over fresh
// tensors (log_softmax, exp, the one-hot subtraction, a copy back), with an exp that
// is accurate to 1 ulp but slow; here each row is read once for its maximum, once for
// the sum of exponentials (written back over the row when a gradient is wanted) and,
// for the gradient, scaled once in place, while the row is in L1.
//
// exp: Cody-Waite range reduction (x = n ln2 + r, |r| <= ln2/2, ln2 split in two) and
// a degree-6 polynomial, relative error below 1e-7 (tests: against torch.exp on a
// grid), written with selects and an add-and-subtract rounding so the loops vectorise
// (AVX2+FMA clone chosen at load time; a baseline clone elsewhere). Arguments below
// -87.3 give 0 (their true values are below fp32's normal range). A NaN or inf logit
// makes the row's NLL NaN, as in PyTorch, so the trainer's non-finite check sees it.
//
// Rows are independent and each is summed in one fixed order, so results do not depend
// on the thread count. No torch headers (see setup.py): Python passes raw pointers.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "registry.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// Comparisons may not trap: lets GCC turn the selects below into vector blends (without
// it the loops stay scalar, ~4x slower). Results are unchanged: nothing here traps.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "no-math-errno")
#endif

namespace mba {
namespace {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;    // ln 2 rounded to 10 bits: n * hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;  // ln 2 - hi
constexpr float kRound = 12582912.0f;      // 1.5 * 2^23: x + kRound - kRound rounds x
constexpr float kMinArg = -87.3f;          // exp below this is under FLT_MIN: 0

inline float exp_approx(float x) {
  const float c = x < kMinArg ? kMinArg : x;
  const float n = (c * kLog2e + kRound) - kRound;
  float r = c - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float y = p * scale;
  return x < kMinArg ? 0.0f : y;  // a NaN x fails the test and stays NaN
}

// Returns 1 when the row's label is outside [0, vocab) (and not ignore_index).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
int ce_row(float* row, int64_t vocab, int64_t label, int64_t ignore_index, float scale,
           bool grad, float* nll) {
  if (label == ignore_index) {
    *nll = 0.0f;
    if (grad) std::memset(row, 0, sizeof(float) * vocab);
    return 0;
  }
  if (label < 0 || label >= vocab) return 1;
  // max of scale * x: scale > 0, so it is scale * max(x). The select may skip a NaN,
  // but the NaN then reaches the sum of exponentials below, and so the NLL.
  float m = row[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < vocab; ++j) m = row[j] > m ? row[j] : m;
  m *= scale;
  const float target = scale * row[label];
  float sum = 0.0f;
  if (grad) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < vocab; ++j) {
      const float e = exp_approx(scale * row[j] - m);
      row[j] = e;
      sum += e;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < vocab; ++j) sum += exp_approx(scale * row[j] - m);
  }
  *nll = m + std::log(sum) - target;
  if (grad) {
    const float g = scale / sum;
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) row[j] *= g;
    row[label] -= scale;
  }
  return 0;
}

// Returns the number of rows whose label is out of range (their outputs are undefined).
int64_t ce_rows(uintptr_t logits_ptr, int64_t rows, int64_t vocab, int64_t row_stride,
                uintptr_t labels_ptr, uintptr_t nll_ptr, float scale, int64_t ignore_index,
                bool grad, int num_threads) {
  if (rows < 0 || vocab <= 0 || row_stride < vocab)
    throw std::invalid_argument("ce_rows: needs rows >= 0, vocab > 0, row_stride >= vocab");
  if (!(scale > 0.0f)) throw std::invalid_argument("ce_rows: scale must be positive");
  float* logits = reinterpret_cast<float*>(logits_ptr);
  const int64_t* labels = reinterpret_cast<const int64_t*>(labels_ptr);
  float* nll = reinterpret_cast<float*>(nll_ptr);
  int64_t bad = 0;
  pybind11::gil_scoped_release no_gil;
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  if (num_threads > rows) num_threads = static_cast<int>(rows);
  if (num_threads > 1) {
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(+ : bad)
    for (int64_t i = 0; i < rows; ++i)
      bad += ce_row(logits + i * row_stride, vocab, labels[i], ignore_index, scale, grad,
                    nll + i);
    return bad;
  }
#else
  (void)num_threads;
#endif
  for (int64_t i = 0; i < rows; ++i)
    bad += ce_row(logits + i * row_stride, vocab, labels[i], ignore_index, scale, grad, nll + i);
  return bad;
}

// exp_approx over a buffer (tests compare it with torch.exp).
void exp_into(uintptr_t out_ptr, uintptr_t in_ptr, int64_t n) {
  float* out = reinterpret_cast<float*>(out_ptr);
  const float* in = reinterpret_cast<const float*>(in_ptr);
  for (int64_t i = 0; i < n; ++i) out[i] = exp_approx(in[i]);
}

}  // namespace

void register_cross_entropy(pybind11::module_& m) {
  m.def("ce_rows", &ce_rows, pybind11::arg("logits_ptr"), pybind11::arg("rows"),
        pybind11::arg("vocab"), pybind11::arg("row_stride"), pybind11::arg("labels_ptr"),
        pybind11::arg("nll_ptr"), pybind11::arg("scale"), pybind11::arg("ignore_index"),
        pybind11::arg("grad"), pybind11::arg("num_threads") = 0,
        "Per row of fp32 logits [rows, row_stride]: nll[i] = logsumexp(scale * x) - scale *\n"
        "x[label]; with grad, the row is overwritten by scale * (softmax - onehot) (0 for\n"
        "ignored rows). labels are int64. OpenMP over rows, GIL released. Returns the\n"
        "number of labels outside [0, vocab) that are not ignore_index.");
  m.def("exp_approx", &exp_into, pybind11::arg("out_ptr"), pybind11::arg("in_ptr"),
        pybind11::arg("n"), "out[:n] = exp(in[:n]) with the kernel's fp32 exp (for tests).");
}

}  // namespace mba
