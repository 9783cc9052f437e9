// The Scaled-WS backward that applies an optimizer step instead of writing dL/dW
// (normfree.optim.update_in_backward). Each row's dL/dW_o (scaled_ws.h) is computed from the
// upstream gradient and the row, never written, clipped by adaptive gradient clipping (Brock et
// al. 2021b, eq. 3; a unit is a row, ||W_o|| from the forward's statistics) and handed to a step
// policy that applies PyTorch's update to the row of W and of the optimizer's state in place,
// while the row is in cache:
//   SgdRows   torch.optim.SGD: weight decay, momentum, dampening, Nesterov, maximize;
//   AdamRows  torch.optim.Adam / AdamW (Kingma & Ba 2015, Alg. 1; Loshchilov & Hutter 2019,
//             Alg. 2): L2 or decoupled weight decay, AMSGrad, maximize; the bias corrections
//             come from the caller, which counts the steps.
// The same numbers as the gradient followed by the optimizer's per-tensor step, to rounding.
// The upstream gradient may be bfloat16 rows of float32 weights, as in scaled_ws.h (each row
// widened first: widened_row).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "scaled_ws.h"

namespace normfree_native {

// Row r's clipped gradient is d.scale * g - d.shift - d.coef * (x - m) (RowGrad); sign is -1
// under maximize. A policy's ahead_a/ahead_b are rows of its state to request while the
// clipping norm sweeps row r from cache; row() applies the step to row r of the thread's block
// [.., end), requesting the next rows meanwhile (g_next: the gradient's next row, which the
// caller knows: the upstream gradient's, or g itself where g is a widened row in a buffer).

// torch.optim.SGD:  d += weight_decay * x;  b = momentum * b + damp * d;
//                   d = Nesterov ? d + momentum * b : b;  x -= lr * d
// (damp = 1 - dampening, or 1 on the buffer's first step, when b holds zeros).
template <bool Momentum, bool Nesterov, bool WeightDecay, typename T>
struct SgdRows {
  T* buf;  // momentum buffer rows (Momentum)
  T lr, momentum, damp, weight_decay, sign;

  const T* ahead_a(int64_t r, int64_t n) const { return Momentum ? buf + r * n : nullptr; }
  const T* ahead_b(int64_t, int64_t) const { return nullptr; }

  void row(const T* __restrict__ g, const T* g_next, T* __restrict__ x, int64_t r, int64_t end,
           T m, const RowGrad<T>& d, int64_t n) const {
    T* __restrict__ b = Momentum ? buf + r * n : nullptr;
    const T* x_next = next_row((const T*)x, r, end, n);
    const T* b_next = Momentum ? next_row((const T*)b, r, end, n) : nullptr;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t stop = std::min(n, b0 + kBlock);
      prefetch_block(g_next + b0, stop - b0);
      prefetch_block(x_next + b0, stop - b0);
      if constexpr (Momentum) prefetch_block(b_next + b0, stop - b0);
      for (int64_t i = b0; i < stop; ++i) {
        T v = sign * (d.scale * g[i] - d.shift - d.coef * (x[i] - m));
        if constexpr (WeightDecay) v += weight_decay * x[i];
        if constexpr (Momentum) {
          const T bi = momentum * b[i] + damp * v;
          b[i] = bi;
          v = Nesterov ? v + momentum * bi : bi;
        }
        x[i] -= lr * v;
      }
    }
  }
};

// torch.optim.Adam / AdamW (decoupled):
//   Decoupled ? x *= 1 - lr * weight_decay : d += weight_decay * x;
//   a = a + (1 - beta1) * (d - a);  v = beta2 * v + (1 - beta2) * d^2;
//   AMSGrad: v_max = max(v_max, v), read in place of v;
//   x -= step_size * a / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t) at step t.
template <bool Amsgrad, bool WeightDecay, bool Decoupled, typename T>
struct AdamRows {
  T* exp_avg;
  T* exp_avg_sq;
  T* max_exp_avg_sq;  // (Amsgrad)
  T step_size, beta1_weight, beta2, beta2_weight, eps, bc2_sqrt, weight_decay, decay, sign;

  const T* ahead_a(int64_t r, int64_t n) const { return exp_avg + r * n; }
  const T* ahead_b(int64_t r, int64_t n) const { return exp_avg_sq + r * n; }

  void row(const T* __restrict__ g, const T* g_next, T* __restrict__ x, int64_t r, int64_t end,
           T m, const RowGrad<T>& d, int64_t n) const {
    T* __restrict__ a = exp_avg + r * n;
    T* __restrict__ v = exp_avg_sq + r * n;
    T* __restrict__ vm = Amsgrad ? max_exp_avg_sq + r * n : nullptr;
    const T* x_next = next_row((const T*)x, r, end, n);
    const T* a_next = next_row((const T*)a, r, end, n);
    const T* v_next = next_row((const T*)v, r, end, n);
    const T* vm_next = Amsgrad ? next_row((const T*)vm, r, end, n) : nullptr;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t stop = std::min(n, b0 + kBlock);
      prefetch_block(g_next + b0, stop - b0);
      prefetch_block(x_next + b0, stop - b0);
      prefetch_block(a_next + b0, stop - b0);
      prefetch_block(v_next + b0, stop - b0);
      if constexpr (Amsgrad) prefetch_block(vm_next + b0, stop - b0);
      for (int64_t i = b0; i < stop; ++i) {
        T grad = sign * (d.scale * g[i] - d.shift - d.coef * (x[i] - m));
        T xi = x[i];
        if constexpr (WeightDecay) {
          if constexpr (Decoupled)
            xi *= decay;
          else
            grad += weight_decay * xi;
        }
        const T ai = a[i] + beta1_weight * (grad - a[i]);
        T vi = v[i] * beta2 + beta2_weight * grad * grad;
        a[i] = ai;
        v[i] = vi;
        if constexpr (Amsgrad) {
          const T old = vm[i];
          vi = (vi > old || vi != vi) ? vi : old;  // torch.maximum: NaN wins
          vm[i] = vi;
        }
        x[i] = xi - step_size * ai / (std::sqrt(vi) / bc2_sqrt + eps);
      }
    }
  }
};

// Row r of a bfloat16 upstream gradient widened into buf, whose later sweeps then read it from
// cache; the next row of the thread's block is requested meanwhile. A runtime choice, not a
// template argument: the kernel is compiled once per step policy and T, and the policies' loops
// are most of the extension's build time.
template <typename T>
inline const T* widened_row(const c10::BFloat16* dy, int64_t r, int64_t end, int64_t n, T* buf) {
  const c10::BFloat16* g = dy + r * n;
  const c10::BFloat16* ahead = next_row(g, r, end, n);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t stop = std::min(n, b + kBlock);
    prefetch_block(ahead + b, stop - b);
    for (int64_t i = b; i < stop; ++i) buf[i] = static_cast<T>(g[i]);
  }
  return buf;
}

// dy: the upstream gradient's rows of T, or null and dy_bf16 its bfloat16 rows.
template <typename Step, typename T>
void ws_backward_update_rows(const T* dy, const c10::BFloat16* dy_bf16, T* w, const T* mean,
                             const T* n_var, const T* gain, T* grad_gain, int64_t rows, int64_t n,
                             T eps, T gamma, T clipping, T agc_eps, const Step& step) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> wide(dy ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      const T* g = dy ? dy + r * n : widened_row(dy_bf16, r, end, n, wide.data());
      T* x = w + r * n;
      const T m = mean[r];
      RowGrad<T> d =
          ws_row_grad(g, (const T*)x, m, n_var[r], gain ? gain[r] : T(1), n, eps, gamma);
      if (grad_gain) grad_gain[r] = d.grad_gain;
      if (clipping > T(0)) {  // AGC: ||dL/dW_o|| against clipping * max(||W_o||, agc_eps)
        // the norm as the plain backward sums it (the same clipping decision), from cache,
        // with this row of the step's state requested meanwhile
        const T norm = std::sqrt(ws_backward_row_out<true, false>(
            g, (const T*)x, step.ahead_a(r, n), step.ahead_b(r, n), (T*)nullptr, m, d.scale,
            d.shift, d.coef, n));
        const T limit = clipping * std::max(std::sqrt(n_var[r] + static_cast<T>(n) * m * m),
                                            agc_eps);
        if (norm > limit) {
          const T factor = limit / std::max(norm, T(1e-6));
          d.scale *= factor;
          d.shift *= factor;
          d.coef *= factor;
        }
      }
      step.row(g, dy ? next_row(g, r, end, n) : g, x, r, end, m, d, n);
    }
  });
}

// A state tensor of the step: contiguous, of the weight rows' shape, dtype and device.
// The kernels update it in place through restrict pointers, so it must not share memory with
// the weight rows (nor, checked by the entry points, with the other state tensors).
inline void check_state(const at::Tensor& t, const at::Tensor& w, const char* name) {
  TORCH_CHECK(t.sizes() == w.sizes() && t.is_contiguous() && t.scalar_type() == w.scalar_type() &&
                  t.device() == w.device(),
              name, " must be a contiguous tensor like the weight rows (shape, dtype, device)");
  at::assert_no_overlap(t, w);
}

// Calls run(std::bool_constant<a>{}, std::bool_constant<b>{}, std::bool_constant<c>{}): the
// kernel's three compile-time switches from runtime flags.
template <typename Run>
void with_switches(bool a, bool b, bool c, Run&& run) {
  using yes = std::true_type;
  using no = std::false_type;
  auto with_c = [&](auto x, auto y) { c ? run(x, y, yes{}) : run(x, y, no{}); };
  auto with_b = [&](auto x) { b ? with_c(x, yes{}) : with_c(x, no{}); };
  a ? with_b(yes{}) : with_b(no{});
}

// The entry points' common part: checks the rows, dispatches on their dtype T, and runs
// ws_backward_update_rows on the gradient's rows (T, or bfloat16) with the step policy that
// with_step(T{}, go) passes to go; returns grad_gain (undefined unless need_gain).
template <typename WithStep>
at::Tensor update_rows(const at::Tensor& dy, at::Tensor& w, const at::Tensor& mean,
                       const at::Tensor& n_var, const c10::optional<at::Tensor>& gain, double eps,
                       double gamma, bool need_gain, double clipping, double agc_eps,
                       WithStep&& with_step) {
  check_grad_rows(dy, w);
  at::assert_no_overlap(dy, w);  // w is updated in place while dy is read
  check_row_stats(mean, n_var, gain, w);
  const int64_t rows = w.size(0), n = w.size(1);
  const bool has_gain = gain.has_value() && gain->defined();
  at::Tensor grad_gain;
  if (need_gain) grad_gain = at::empty({rows}, w.options());
  const bool bf16 = bf16_grad(dy, w);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "scaled_ws_backward_update", [&] {
    using T = scalar_t;
    with_step(T{}, [&](const auto& step) {
      ws_backward_update_rows<std::decay_t<decltype(step)>, T>(
          bf16 ? nullptr : dy.data_ptr<T>(), bf16 ? dy.data_ptr<c10::BFloat16>() : nullptr,
          w.data_ptr<T>(), mean.data_ptr<T>(), n_var.data_ptr<T>(),
          has_gain ? gain->data_ptr<T>() : nullptr, need_gain ? grad_gain.data_ptr<T>() : nullptr,
          rows, n, static_cast<T>(eps), static_cast<T>(gamma), static_cast<T>(clipping),
          static_cast<T>(agc_eps), step);
    });
  });
  return grad_gain;
}

}  // namespace normfree_native

// The backward of the weight rows with torch.optim.SGD's step applied in place: w and, with
// momentum, buf (zeros on its first step, with dampening 0) are updated; returns grad_gain
// (undefined unless need_gain). clipping <= 0: no AGC.
at::Tensor scaled_ws_backward_sgd(const at::Tensor& dy, at::Tensor w, const at::Tensor& mean,
                                  const at::Tensor& n_var, const c10::optional<at::Tensor>& gain,
                                  const c10::optional<at::Tensor>& buf, double eps, double gamma,
                                  bool need_gain, double lr, double momentum, double dampening,
                                  double weight_decay, bool nesterov, bool maximize,
                                  double clipping, double agc_eps) {
  const bool has_buf = buf.has_value() && buf->defined();
  TORCH_CHECK(has_buf == (momentum != 0.0), "a momentum buffer is needed exactly with momentum");
  if (has_buf) normfree_native::check_state(*buf, w, "the momentum buffer");
  TORCH_CHECK(!nesterov || has_buf, "Nesterov momentum needs momentum");
  return normfree_native::update_rows(
      dy, w, mean, n_var, gain, eps, gamma, need_gain, clipping, agc_eps,
      [&](auto zero, auto&& go) {
        using T = decltype(zero);
        normfree_native::with_switches(has_buf, nesterov, weight_decay != 0.0,
                                       [&](auto mo, auto ne, auto wd) {
          go(normfree_native::SgdRows<decltype(mo)::value, decltype(ne)::value,
                                      decltype(wd)::value, T>{
              has_buf ? buf->data_ptr<T>() : nullptr, static_cast<T>(lr),
              static_cast<T>(momentum), static_cast<T>(1.0 - dampening),
              static_cast<T>(weight_decay), static_cast<T>(maximize ? -1.0 : 1.0)});
        });
      });
}

// The backward of the weight rows with torch.optim.Adam's (decoupled: AdamW's) step applied in
// place to w, exp_avg, exp_avg_sq and, for AMSGrad, max_exp_avg_sq, at the step whose
// step_size = lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t) are given; returns grad_gain
// (undefined unless need_gain). clipping <= 0: no AGC.
at::Tensor scaled_ws_backward_adam(
    const at::Tensor& dy, at::Tensor w, const at::Tensor& mean, const at::Tensor& n_var,
    const c10::optional<at::Tensor>& gain, at::Tensor exp_avg, at::Tensor exp_avg_sq,
    const c10::optional<at::Tensor>& max_exp_avg_sq, double eps, double gamma, bool need_gain,
    double lr, double beta1, double beta2, double adam_eps, double weight_decay, bool decoupled,
    bool maximize, double step_size, double bc2_sqrt, double clipping, double agc_eps) {
  normfree_native::check_state(exp_avg, w, "exp_avg");
  normfree_native::check_state(exp_avg_sq, w, "exp_avg_sq");
  const bool amsgrad = max_exp_avg_sq.has_value() && max_exp_avg_sq->defined();
  if (amsgrad) normfree_native::check_state(*max_exp_avg_sq, w, "max_exp_avg_sq");
  at::assert_no_overlap(exp_avg, exp_avg_sq);
  if (amsgrad) {
    at::assert_no_overlap(exp_avg, *max_exp_avg_sq);
    at::assert_no_overlap(exp_avg_sq, *max_exp_avg_sq);
  }
  return normfree_native::update_rows(
      dy, w, mean, n_var, gain, eps, gamma, need_gain, clipping, agc_eps,
      [&](auto zero, auto&& go) {
        using T = decltype(zero);
        normfree_native::with_switches(amsgrad, weight_decay != 0.0, decoupled,
                                       [&](auto am, auto wd, auto de) {
          go(normfree_native::AdamRows<decltype(am)::value, decltype(wd)::value,
                                       decltype(de)::value, T>{
              exp_avg.data_ptr<T>(), exp_avg_sq.data_ptr<T>(),
              amsgrad ? max_exp_avg_sq->data_ptr<T>() : nullptr, static_cast<T>(step_size),
              static_cast<T>(1.0 - beta1), static_cast<T>(beta2), static_cast<T>(1.0 - beta2),
              static_cast<T>(adam_eps), static_cast<T>(bc2_sqrt), static_cast<T>(weight_decay),
              static_cast<T>(1.0 - lr * weight_decay), static_cast<T>(maximize ? -1.0 : 1.0)});
        });
      });
}
