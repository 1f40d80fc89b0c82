// The megablocks_ablate._C extension: CPU helpers (OpenMP), no torch headers.
#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "megablocks-ablate C++ helpers (dataset index building, merge kernels, cross-entropy rows)";
  mba::register_dataset_index(m);
  mba::register_merge(m);
  mba::register_cross_entropy(m);
}
