// normfree's native CPU kernels as PyTorch operators, in the namespace named after the
// extension (normfree.nn.native loads the library and calls torch.ops.<name>.<op>). Registering
// through torch/library.h rather than binding a Python module with torch/python.h halves the
// build: this file takes ~9 s where the pybind11 bindings took ~30 s, and it compiles in
// parallel with kernels.cpp. Mutated arguments carry (a!) annotations; the kernels read raw
// rows, so they are registered for CPU only (the Python callers check device and dtype).
#include <torch/library.h>

#include "ops.h"

// TORCH_LIBRARY stringifies its first argument: one more expansion turns the build's
// TORCH_EXTENSION_NAME into its value.
#define NORMFREE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define NORMFREE_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

NORMFREE_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("scaled_ws_forward(Tensor w, Tensor? gain, float eps, float gamma, bool bf16_out=False)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("scaled_ws_backward(Tensor dy, Tensor w, Tensor mean, Tensor n_var, Tensor? gain,"
        " float eps, float gamma, bool need_weight, bool need_gain, bool need_norm)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("scaled_ws_backward_sgd(Tensor dy, Tensor(a!) w, Tensor mean, Tensor n_var,"
        " Tensor? gain, Tensor(b!)? buf, float eps, float gamma, bool need_gain, float lr,"
        " float momentum, float dampening, float weight_decay, bool nesterov, bool maximize,"
        " float clipping, float agc_eps) -> Tensor");
  m.def("scaled_ws_backward_adam(Tensor dy, Tensor(a!) w, Tensor mean, Tensor n_var,"
        " Tensor? gain, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!)? max_exp_avg_sq,"
        " float eps, float gamma, bool need_gain, float lr, float beta1, float beta2,"
        " float adam_eps, float weight_decay, bool decoupled, bool maximize, float step_size,"
        " float bc2_sqrt, float clipping, float agc_eps) -> Tensor");
  m.def("tanh_gelu_forward(Tensor x) -> Tensor");
  m.def("tanh_gelu_backward(Tensor g, Tensor x) -> Tensor");
}

NORMFREE_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("scaled_ws_forward", &scaled_ws_forward);
  m.impl("scaled_ws_backward", &scaled_ws_backward);
  m.impl("scaled_ws_backward_sgd", &scaled_ws_backward_sgd);
  m.impl("scaled_ws_backward_adam", &scaled_ws_backward_adam);
  m.impl("tanh_gelu_forward", &tanh_gelu_forward);
  m.impl("tanh_gelu_backward", &tanh_gelu_backward);
}
