// A linear map of a small batch of pooled features, y = x W^T + b with x (B, I), W (O, I), for
// the squeeze-excite layers of NFNets / NF-RegNets (Hu et al. 2018; Brock et al. 2021b, §4.1),
// whose 1x1 convolutions act on (B, C, 1, 1) means. With B small the work is bound by reading W
// (forward) and writing dL/dW (backward), so one pass per output unit o, with its row W_o in L1,
// computes everything that unit needs and also, at no extra memory traffic, the two per-unit
// quantities adaptive gradient clipping (Brock et al. 2021b, eq. 3) would otherwise read W and
// dL/dW again for:
//   forward:  y[b, o] = b_o + <x_b, W_o>,   mean_o = mean(W_o),   n_var_o = sum((W_o - mean_o)^2)
//             (so ||W_o||^2 = n_var_o + I mean_o^2, the statistics the Scaled-WS kernel keeps);
//   backward: dW_o = sum_b dy[b, o] x_b,   ||dW_o||,   db_o = sum_b dy[b, o],
//             dx_b = sum_o dy[b, o] W_o (per-thread partial sums, added at the end).
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "row_ops.h"

namespace normfree_native {

template <typename T>
void pooled_forward_rows(const T* x, const T* w, const T* bias, T* y, T* mean, T* n_var, int64_t batch,
                  int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const T* wo = w + o * n;
      for (int64_t b = 0; b < batch; ++b)
        y[b * rows + o] = (bias ? bias[o] : T(0)) + row_dot(x + b * n, wo, n);
      const T m = row_sum(wo, n) / static_cast<T>(n);
      mean[o] = m;
      n_var[o] = row_centred_square_sum(wo, m, n);
    }
  });
}

template <typename T>
void pooled_backward_rows(const T* dy, const T* x, const T* w, T* grad_x, T* grad_w, T* grad_norm,
                   int64_t batch, int64_t rows, int64_t n) {
  const int64_t threads = at::get_num_threads();
  std::vector<T> partial(grad_x ? static_cast<size_t>(threads * batch * n) : 0, T(0));
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    T* gx = grad_x ? partial.data() + at::get_thread_num() * batch * n : nullptr;
    for (int64_t o = begin; o < end; ++o) {
      const T* wo = w + o * n;
      if (gx)
        for (int64_t b = 0; b < batch; ++b) {
          const T d = dy[b * rows + o];
          T* gxb = gx + b * n;
          for (int64_t i = 0; i < n; ++i) gxb[i] += d * wo[i];
        }
      if (!grad_w) continue;
      T* go = grad_w + o * n;
      const T d0 = dy[o];
      for (int64_t i = 0; i < n; ++i) go[i] = d0 * x[i];
      for (int64_t b = 1; b < batch; ++b) {
        const T d = dy[b * rows + o];
        const T* xb = x + b * n;
        for (int64_t i = 0; i < n; ++i) go[i] += d * xb[i];
      }
      if (grad_norm) grad_norm[o] = std::sqrt(row_square_sum(go, n));
    }
  });
  if (grad_x) {
    const int64_t size = batch * n;
    for (int64_t i = 0; i < size; ++i) grad_x[i] = partial[i];
    for (int64_t t = 1; t < threads; ++t) {
      const T* p = partial.data() + t * size;
      for (int64_t i = 0; i < size; ++i) grad_x[i] += p[i];
    }
  }
}

}  // namespace normfree_native

// (y, mean, n_var) of x (B, I) through w (O, I) and an optional bias (O,).
inline std::vector<at::Tensor> pooled_linear_forward(const at::Tensor& x, const at::Tensor& w,
                                              const c10::optional<at::Tensor>& bias) {
  normfree_native::check_rows(x, "input");
  normfree_native::check_rows(w, "weight");
  TORCH_CHECK(x.size(1) == w.size(1) && x.scalar_type() == w.scalar_type(),
              "input and weight must share their inner size and dtype");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == w.size(0) &&
                    bias->scalar_type() == w.scalar_type(),
                "bias must be a contiguous (out,) tensor of the weight's dtype");
  const int64_t batch = x.size(0), rows = w.size(0), n = w.size(1);
  auto y = at::empty({batch, rows}, w.options());
  auto mean = at::empty({rows}, w.options());
  auto n_var = at::empty({rows}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pooled_linear_forward", [&] {
    normfree_native::pooled_forward_rows<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                           has_bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                           mean.data_ptr<scalar_t>(), n_var.data_ptr<scalar_t>(), batch, rows, n);
  });
  return {y, mean, n_var};
}

// (grad_x, grad_w, grad_bias, per-row norm of grad_w), each undefined unless asked for.
inline std::vector<at::Tensor> pooled_linear_backward(const at::Tensor& dy, const at::Tensor& x,
                                               const at::Tensor& w, bool need_x, bool need_w,
                                               bool need_bias, bool need_norm) {
  normfree_native::check_rows(dy, "grad");
  normfree_native::check_rows(x, "input");
  normfree_native::check_rows(w, "weight");
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(1) == w.size(0) && x.size(1) == w.size(1) &&
                  dy.scalar_type() == w.scalar_type() && x.scalar_type() == w.scalar_type(),
              "grad, input and weight do not match");
  TORCH_CHECK(need_w || !need_norm, "the gradient's norm needs the gradient");
  const int64_t batch = x.size(0), rows = w.size(0), n = w.size(1);
  at::Tensor grad_x, grad_w, grad_bias, grad_norm;
  if (need_x) grad_x = at::empty_like(x);
  if (need_w) grad_w = at::empty_like(w);
  if (need_bias) grad_bias = dy.sum(0);
  if (need_norm) grad_norm = at::empty({rows}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pooled_linear_backward", [&] {
    normfree_native::pooled_backward_rows<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                            w.data_ptr<scalar_t>(),
                            need_x ? grad_x.data_ptr<scalar_t>() : nullptr,
                            need_w ? grad_w.data_ptr<scalar_t>() : nullptr,
                            need_norm ? grad_norm.data_ptr<scalar_t>() : nullptr, batch, rows, n);
  });
  return {grad_x, grad_w, grad_bias, grad_norm};
}
