// pyfastpeft._C: the optional CUDA extension.
//
// Importing `pyfastpeft._C` only has to load this shared object; the static TORCH_LIBRARY /
// TORCH_LIBRARY_IMPL blocks then register the ops with the dispatcher as
// torch.ops.pyfastpeft_C.<op>. No pybind11 and no Python C-API beyond this stub, so the module
// builds against the stable ABI (Py_LIMITED_API, one abi3 .so for every CPython >= 3.10).
//
// Every schema of the extension is declared here, in one place. Implementations register for the
// CUDA dispatch key only (csrc/<op>/*.cu); calling an op with CPU tensors fails in the dispatcher
// with "Could not run 'pyfastpeft_C::<op>' with arguments from the 'CPU' backend".
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

TORCH_LIBRARY(pyfastpeft_C, m) {
  // u = x @ a.T; x (M, K), a (R, K) -> u (M, R) in x.dtype, fp32 accumulation.
  m.def("lora_shrink(Tensor x, Tensor a) -> Tensor");
  // y += scale * u @ b.T, in place; y (M, N), u (M, R), b (N, R), fp32 accumulation.
  m.def("lora_expand_add_(Tensor(a!) y, Tensor u, Tensor b, float scale) -> ()");
}
