// Placeholder until the packed-sample index builder lands (see data/sample_index.py).
#include "registry.h"

namespace mba {
void register_dataset_index(pybind11::module_& m) {
  m.def("abi_version", []() { return 1; }, "ABI version of the _C extension");
}
}  // namespace mba
