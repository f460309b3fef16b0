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
  // Token-selective LoRA. ratio_i = scale*sqrt(u_i^T gram u_i) / max(sqrt(sum_g hsq[g, i]), 1e-6),
  // selected_i = ratio_i >= max(tau, 0); index[:count] the selected rows in increasing order (int32).
  // u (M, R), gram (R, R) fp32, hsq (G, M) fp32, tau 0-dim fp32.
  m.def("gated_gate(Tensor u, Tensor gram, Tensor hsq, Tensor tau, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // y[index[j]] += scale * u[index[j]] @ b.T for j < count[0], in place.
  m.def("gated_expand_add_(Tensor(a!) y, Tensor u, Tensor b, Tensor index, Tensor count, float scale) -> ()");
  // Filter atoms (csrc/atoms/atoms.cu): dD (C_in, m, kh, kw) fp32 of atom_conv2d without the weight gradient;
  // dy (N, C_out, Ho, Wo), x (N, C_in, H, W) any strides, coeff (C_out, C_in/groups, m), m <= 16, kh*kw <= 64.
  m.def("atom_grad_conv2d(Tensor dy, Tensor x, Tensor coeff, int kh, int kw, int[] stride, int[] padding,"
        " int[] dilation, int groups) -> Tensor");
  // Exact batched Cayley (csrc/orthogonal/cayley.cu): v (G, b(b-1)/2) fp32 packed upper triangles ->
  // R (G, b, b) fp32, (I - Q)(I + Q)^-1 if minus else (I + Q)(I - Q)^-1; 2 <= b <= 128.
  m.def("cayley_exact(Tensor v, int block_size, bool minus) -> Tensor");
}
