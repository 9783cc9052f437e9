// The entry points of normfree's native CPU kernels, as the operators of library.cpp call them
// (defined in scaled_ws.h, scaled_ws_update.h and tanh_gelu.h, compiled in kernels.cpp). Only
// ATen's tensor type: library.cpp, which includes this, builds in parallel with the kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

// Scaled WS over weight rows (scaled_ws.h): (out, mean, n_var), and (grad_weight, grad_gain,
// grad_norm), each undefined unless asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> scaled_ws_forward(
    const at::Tensor& w, const c10::optional<at::Tensor>& gain, double eps, double gamma,
    bool bf16_out);
std::tuple<at::Tensor, at::Tensor, at::Tensor> scaled_ws_backward(
    const at::Tensor& dy, const at::Tensor& w, const at::Tensor& mean, const at::Tensor& n_var,
    const c10::optional<at::Tensor>& gain, double eps, double gamma, bool need_weight,
    bool need_gain, bool need_norm);

// The Scaled-WS backward with AGC and an optimizer step applied to the rows in place
// (scaled_ws_update.h); each returns grad_gain, undefined unless need_gain.
at::Tensor scaled_ws_backward_sgd(const at::Tensor& dy, at::Tensor w, const at::Tensor& mean,
                                  const at::Tensor& n_var, const c10::optional<at::Tensor>& gain,
                                  const c10::optional<at::Tensor>& buf, double eps, double gamma,
                                  bool need_gain, double lr, double momentum, double dampening,
                                  double weight_decay, bool nesterov, bool maximize,
                                  double clipping, double agc_eps);
at::Tensor scaled_ws_backward_adam(
    const at::Tensor& dy, at::Tensor w, const at::Tensor& mean, const at::Tensor& n_var,
    const c10::optional<at::Tensor>& gain, at::Tensor exp_avg, at::Tensor exp_avg_sq,
    const c10::optional<at::Tensor>& max_exp_avg_sq, double eps, double gamma, bool need_gain,
    double lr, double beta1, double beta2, double adam_eps, double weight_decay, bool decoupled,
    bool maximize, double step_size, double bc2_sqrt, double clipping, double agc_eps);

// tanh-GELU, float32 (tanh_gelu.h).
at::Tensor tanh_gelu_forward(const at::Tensor& x);
at::Tensor tanh_gelu_backward(const at::Tensor& g, const at::Tensor& x);
