// pyfastpeft._C: the optional CUDA extension.
//
// Importing `pyfastpeft._C` only has to load this shared object; the static TORCH_LIBRARY /
// TORCH_LIBRARY_IMPL blocks then register the ops with the dispatcher as
// torch.ops.pyfastpeft_C.<op>. No pybind11 and no Python C-API beyond this stub, so the module
// builds against the stable ABI (Py_LIMITED_API, one abi3 .so for every CPython >= 3.10).
//
// Each family's schemas and CUDA implementations live in csrc/<family>/ (TORCH_LIBRARY_FRAGMENT and
// TORCH_LIBRARY_IMPL for the CUDA dispatch key only); calling an op with CPU tensors fails in the
// dispatcher with "Could not run 'pyfastpeft_C::<op>' with arguments from the 'CPU' backend".
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // m_name
      nullptr,  // m_doc
      -1,       // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
}

// The namespace; each family declares its own schemas beside their kernels (TORCH_LIBRARY_FRAGMENT in
// csrc/<family>/*.cu), so a new family adds a folder and touches nothing here.
TORCH_LIBRARY(pyfastpeft_C, m) {}
