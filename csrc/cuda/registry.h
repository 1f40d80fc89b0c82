// Each csrc/cuda/*.cu file exposes one `register_<concern>_cuda(m)` function;
// module.cpp calls them all (same pattern as csrc/registry.h for the CPU extension).
#pragma once
#include <pybind11/pybind11.h>

namespace mba_cuda {
void register_merge_cuda(pybind11::module_& m);
}  // namespace mba_cuda
