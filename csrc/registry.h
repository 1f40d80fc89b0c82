// Each csrc/*.cpp file exposes one `register_<concern>(m)` function; module.cpp
// calls them all, so adding a kernel file means one declaration + one call here.
#pragma once
#include <pybind11/pybind11.h>

namespace mba {
void register_dataset_index(pybind11::module_& m);
void register_merge(pybind11::module_& m);
void register_cross_entropy(pybind11::module_& m);
}  // namespace mba
