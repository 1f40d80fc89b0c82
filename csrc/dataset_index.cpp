// Index builders for packed samples and mixtures (see megablocks_ablate/data/sample_index.py,
// which holds the NumPy twins these must match exactly, and documents the semantics).
//
// build_sample_index: row i of the [num_samples + 1, 2] result is (position in the document
//   index, offset in that document) of global token i * seq_len of the concatenated stream;
//   the document is the one *containing* the token, so zero-length documents are skipped.
// build_blending_indices: greedy blending, position i goes to argmax(w * (i + 1) - counts),
//   first index on ties.
//
// Both loops are sequential and cheap; they run with the GIL released.

// The blending comparison must round w * x and the subtraction separately, as NumPy does:
// a fused multiply-add (GCC contracts by default when FMA is available, e.g. -march=native)
// could flip a near-tie and break bit-equality with the NumPy twin.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "registry.h"

namespace py = pybind11;

namespace mba {
namespace {

using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

py::array_t<int64_t> build_sample_index(I32Array sizes, I32Array doc_idx, int64_t seq_len,
                                        int64_t num_epochs, int64_t tokens_per_epoch,
                                        int64_t num_samples) {
  if (seq_len <= 0) throw std::invalid_argument("seq_len must be positive");
  if (num_epochs <= 0 || tokens_per_epoch <= 0)
    throw std::invalid_argument("num_epochs and tokens_per_epoch must be positive");
  if (sizes.ndim() != 1 || doc_idx.ndim() != 1)
    throw std::invalid_argument("sizes and doc_idx must be 1-D");
  if (num_samples < 0) num_samples = (num_epochs * tokens_per_epoch - 1) / seq_len;

  const int32_t* sz = sizes.data();
  const int32_t* di = doc_idx.data();
  const int64_t n_sizes = sizes.shape(0);
  const int64_t n_docs = doc_idx.shape(0);
  for (int64_t k = 0; k < n_docs; ++k) {
    if (di[k] < 0 || di[k] >= n_sizes)
      throw std::out_of_range("document_index holds ids outside [0, " + std::to_string(n_sizes) +
                              ")");
  }

  py::array_t<int64_t> out({num_samples + 1, static_cast<int64_t>(2)});
  int64_t* o = out.mutable_data();
  int64_t total_seen = -1;  // set when the document index runs out of tokens
  {
    py::gil_scoped_release release;
    int64_t j = 0;      // position in the document index
    int64_t start = 0;  // global token position where document j starts
    for (int64_t i = 0; i <= num_samples; ++i) {
      const int64_t p = i * seq_len;
      while (j < n_docs && start + sz[di[j]] <= p) {
        start += sz[di[j]];
        ++j;
      }
      if (j == n_docs) {
        total_seen = start;
        break;
      }
      o[2 * i] = j;
      o[2 * i + 1] = p - start;
    }
  }
  if (total_seen >= 0)
    throw std::invalid_argument(std::to_string(num_samples) + " samples of " +
                                std::to_string(seq_len) + "+1 tokens need " +
                                std::to_string(num_samples * seq_len + 1) +
                                " tokens; the document index holds " + std::to_string(total_seen));
  return out;
}

template <typename Index>
py::tuple blend(const double* w, int64_t n, int64_t size) {
  py::array_t<Index> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  Index* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> counts(n, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double x = static_cast<double>(i + 1);
      int64_t best = 0;
      double best_err = w[0] * x - static_cast<double>(counts[0]);
      for (int64_t d = 1; d < n; ++d) {
        const double err = w[d] * x - static_cast<double>(counts[d]);
        if (err > best_err) {
          best = d;
          best_err = err;
        }
      }
      di[i] = static_cast<Index>(best);
      dsi[i] = counts[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

py::tuple build_blending_indices(F64Array weights, int64_t size) {
  if (weights.ndim() != 1 || weights.shape(0) == 0)
    throw std::invalid_argument("weights must be a non-empty 1-D array");
  if (size < 0) throw std::invalid_argument("size must be non-negative");
  const double* w = weights.data();
  const int64_t n = weights.shape(0);
  for (int64_t d = 0; d < n; ++d) {
    if (!std::isfinite(w[d]) || w[d] < 0)
      throw std::invalid_argument("weights must be finite and non-negative");
  }
  if (n <= std::numeric_limits<int16_t>::max()) return blend<int16_t>(w, n, size);
  return blend<int32_t>(w, n, size);
}

}  // namespace

void register_dataset_index(py::module_& m) {
  m.def("abi_version", []() { return 1; }, "ABI version of the _C extension");
  m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_len"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("num_samples") = -1,
        "Packed-sample index [num_samples + 1, 2] of (document-index position, offset); "
        "num_samples=-1 takes every full sample of num_epochs * tokens_per_epoch tokens.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "Greedy blend: (dataset_index int16|int32, dataset_sample_index int64) of length size.");
}

}  // namespace mba
