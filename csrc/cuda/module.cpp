// The megablocks_ablate._C_cuda extension: CUDA kernels with a plain pybind11 ABI
// (raw device pointers + dtype codes), built only where torch with CUDA and nvcc exist.
#include "registry.h"

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "megablocks-ablate CUDA kernels (merge)";
  mba_cuda::register_merge_cuda(m);
}
