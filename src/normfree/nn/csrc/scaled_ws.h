// Scaled Weight Standardization (Brock et al. 2021a, eq. 2) on CPU, one output unit per row of
// a contiguous (out, fan_in) weight: W_hat = gain * gamma * (W - mu) * rsqrt(max(N var, eps)).
//
// Each row (at most a few tens of KB) is read from memory once and stays in L1 for the
// statistics and the output, so the forward costs one read and one write of the weight and the
// backward two reads and one write, against six and five passes for the same formula written
// with PyTorch ops. A row is swept a few times (each sum with one set of lane partial sums,
// row_ops.h), the first from memory and the rest from cache. Compiled in kernels.cpp, its
// entry points declared in ops.h (normfree.nn.native builds it).
//
// Forward:  mean = sum(w) / N, n_var = sum((w - mean)^2), rstd = 1 / sqrt(max(n_var, eps)).
// Backward (dy = dL/dW_hat, c = w - mean, s = gain * gamma * rstd):
//   dL/dW    = s * (dy - mean(dy)) - s * rstd^2 * sum(dy * c) * c   (last term 0 where floored)
//   dL/dgain = gamma * rstd * sum(dy * c)
// The backward can also return each row's norm ||dL/dW_o||, summed while the row is written:
// adaptive gradient clipping reads it instead of a pass over the gradients.
//
// Under CPU autocast the convolution runs in bfloat16 and would cast W_hat to it: a float32
// forward can write W_hat as bfloat16 itself (computed in float32, rounded once to nearest
// even: the bits of W_hat.to(bfloat16) but for a NaN's payload), and the backward reads the
// bfloat16 dL/dW_hat the convolution returns (widened exactly). Each saves a cast, a pass
// over the weight each way.
//
// The backward that applies an optimizer step instead of writing dL/dW: scaled_ws_update.h.
#pragma once

#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "row_ops.h"

namespace normfree_native {

// The kernels' last sweep over a row (the output) runs from cache while the memory bus idles,
// so they request the next row of the thread's share meanwhile, one block of kBlock elements
// at a time: a few prefetches per block ahead of a plain loop over it, which GCC vectorises as
// it does without them (a prefetch inside the 8-lane loop stops that). On the 53 nf_resnet50
// weights (90 MiB, 2 threads, Xeon) the forward went from 8.6 to 7.3 ms and the backward from
// 14.2 to 11.3 ms, level with a plain two-input add over the same tensors (10.3-11.1 ms).
constexpr int64_t kBlock = 256;
static_assert(kBlock % kLanes == 0, "the norm's 8-lane sweep steps through whole blocks");

template <typename T>
inline void prefetch_block(const T* p, int64_t count) {
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t k = 0; k < count; k += line) prefetch(p + k);
}

// One output row of the forward, y = (x - m) * scale in T, stored as O (T, or bfloat16 for a
// float32 T), with the row x_next requested meanwhile.
template <typename T, typename O>
inline void ws_forward_row_out(const T* x, const T* x_next, O* y, T m, T scale, int64_t n) {
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t stop = std::min(n, b + kBlock);
    prefetch_block(x_next + b, stop - b);
    for (int64_t i = b; i < stop; ++i) y[i] = static_cast<O>((x[i] - m) * scale);
  }
}

// One row of dL/dW = scale * g - shift - coef * (x - m) (g a row of G: T, or bfloat16 for a
// float32 T): written to out when Write, its squared norm returned when WithNorm (else 0),
// summed in kLanes partial sums and then the tail, in the order of row_sum; the rows ahead_a
// and ahead_b (either may be null) are requested meanwhile.
template <bool WithNorm, bool Write, typename G, typename T, typename A, typename B>
inline T ws_backward_row_out(const G* g, const T* x, const A* ahead_a, const B* ahead_b, T* out,
                             T m, T scale, T shift, T coef, int64_t n) {
  const int64_t whole = n - n % kLanes;
  T acc[kLanes] = {};
  for (int64_t b = 0; b < whole; b += kBlock) {
    const int64_t stop = std::min(whole, b + kBlock);
    if (ahead_a) prefetch_block(ahead_a + b, stop - b);
    if (ahead_b) prefetch_block(ahead_b + b, stop - b);
    for (int64_t j = b; j < stop; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const T v = scale * static_cast<T>(g[j + l]) - shift - coef * (x[j + l] - m);
        if constexpr (Write) out[j + l] = v;
        if constexpr (WithNorm) acc[l] += v * v;
      }
  }
  T sq = lane_sum(acc);
  for (int64_t j = whole; j < n; ++j) {
    const T v = scale * static_cast<T>(g[j]) - shift - coef * (x[j] - m);
    if constexpr (Write) out[j] = v;
    if constexpr (WithNorm) sq += v * v;
  }
  return sq;
}

// The per-row constants of dL/dW = scale * g - shift - coef * (x - m) (header comment) from the
// row's two sums; also dL/dgain.
template <typename T>
struct RowGrad {
  T scale, shift, coef, grad_gain;
};

template <typename G, typename T>
inline RowGrad<T> ws_row_grad(const G* g, const T* x, T m, T n_var, T gain, int64_t n, T eps,
                              T gamma) {
  // two sweeps of the row (the second from cache), each with one set of partial sums
  const T sum_g = row_sum(g, n), sum_gc = row_centred_dot(g, x, m, n);
  const T rstd = T(1) / std::sqrt(std::max(n_var, eps));
  const T scale = gain * gamma * rstd;
  const T coef = n_var < eps ? T(0) : scale * rstd * rstd * sum_gc;  // 0 where floored
  return {scale, scale * sum_g / static_cast<T>(n), coef, gamma * rstd * sum_gc};
}

template <typename T, typename O>
void ws_forward_rows(const T* w, const T* gain, O* out, T* mean, T* n_var, int64_t rows, int64_t n,
                  T eps, T gamma) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = w + r * n;
      O* y = out + r * n;
      const T m = row_sum(x, n) / static_cast<T>(n);
      const T q = row_centred_square_sum(x, m, n);
      const T scale = (gain ? gain[r] : T(1)) * gamma / std::sqrt(std::max(q, eps));
      ws_forward_row_out(x, next_row(x, r, end, n), y, m, scale, n);
      mean[r] = m;
      n_var[r] = q;
    }
  });
}

template <typename G, typename T>
void ws_backward_rows(const G* dy, const T* w, const T* mean, const T* n_var, const T* gain,
                   T* grad_w, T* grad_gain, T* grad_norm, int64_t rows, int64_t n, T eps,
                   T gamma) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const G* g = dy + r * n;
      const T* x = w + r * n;
      const T m = mean[r];
      const RowGrad<T> d =
          ws_row_grad(g, x, m, n_var[r], gain ? gain[r] : T(1), n, eps, gamma);
      if (grad_gain) grad_gain[r] = d.grad_gain;
      if (grad_w) {
        const G* g_next = next_row(g, r, end, n);
        const T* x_next = next_row(x, r, end, n);
        T* row = grad_w + r * n;
        if (grad_norm)
          grad_norm[r] = std::sqrt(ws_backward_row_out<true, true>(
              g, x, g_next, x_next, row, m, d.scale, d.shift, d.coef, n));
        else
          ws_backward_row_out<false, true>(g, x, g_next, x_next, row, m, d.scale, d.shift,
                                           d.coef, n);
      }
    }
  });
}


// Whether the upstream gradient is bfloat16 rows of a float32 weight (what the backward of an
// autocast convolution hands back for a bfloat16 forward output).
inline bool bf16_grad(const at::Tensor& dy, const at::Tensor& w) {
  return dy.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kFloat;
}

// The upstream gradient and the weight rows of a backward: contiguous 2-D CPU rows of one
// shape, and of one dtype or a bfloat16 gradient of float32 rows.
inline void check_grad_rows(const at::Tensor& dy, const at::Tensor& w) {
  check_rows(w, "weight");
  TORCH_CHECK(dy.device().is_cpu() && dy.dim() == 2 && dy.is_contiguous(),
              "grad must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(dy.sizes() == w.sizes(), "grad must have the weight's shape");
  TORCH_CHECK(dy.scalar_type() == w.scalar_type() || bf16_grad(dy, w),
              "grad must have the weight's dtype (or bfloat16 for a float32 weight)");
}

// Calls run(G{}, T{}) with T the weight rows' dtype and G the gradient's (T, or bfloat16).
// The plain backward reads a bfloat16 gradient row as it is, G a template argument: on
// nf_resnet50's 53 weights that is 1.5-2 ms faster than widening each row into a buffer first,
// for a few more instantiations. The update kernels widen instead (widened_row in
// scaled_ws_update.h): compiling their 16 step policies per G cost 7.5 s of build time.
template <typename Run>
void dispatch_grad_rows(const at::Tensor& dy, const at::Tensor& w, Run&& run) {
  if (bf16_grad(dy, w)) {
    run(c10::BFloat16{}, float{});
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "scaled_ws_backward",
                             [&] { run(scalar_t{}, scalar_t{}); });
}

}  // namespace normfree_native

// (out, mean, n_var) of weight rows (out, fan_in); gain is an (out,) tensor or undefined;
// out is bfloat16 when bf16_out (float32 rows only), else of the rows' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> scaled_ws_forward(
    const at::Tensor& w, const c10::optional<at::Tensor>& gain, double eps, double gamma,
    bool bf16_out) {
  normfree_native::check_rows(w, "weight");
  TORCH_CHECK(!bf16_out || w.scalar_type() == at::kFloat, "a bfloat16 output needs float32 rows");
  const int64_t rows = w.size(0), n = w.size(1);
  auto out = bf16_out ? at::empty_like(w, w.options().dtype(at::kBFloat16)) : at::empty_like(w);
  auto mean = at::empty({rows}, w.options());
  auto n_var = at::empty({rows}, w.options());
  const bool has_gain = gain.has_value() && gain->defined();
  if (has_gain) normfree_native::check_row_values(*gain, w, "gain");
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "scaled_ws_forward", [&] {
    auto run = [&](auto* y) {
      normfree_native::ws_forward_rows(w.data_ptr<scalar_t>(),
                                       has_gain ? gain->data_ptr<scalar_t>() : nullptr, y,
                                       mean.data_ptr<scalar_t>(), n_var.data_ptr<scalar_t>(),
                                       rows, n, static_cast<scalar_t>(eps),
                                       static_cast<scalar_t>(gamma));
    };
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (bf16_out) return run(out.data_ptr<c10::BFloat16>());
    }
    run(out.data_ptr<scalar_t>());
  });
  return {out, mean, n_var};
}

// (grad_weight, grad_gain, per-row norm of grad_weight), each undefined unless asked for, for an
// upstream gradient of the output rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> scaled_ws_backward(
    const at::Tensor& dy, const at::Tensor& w, const at::Tensor& mean, const at::Tensor& n_var,
    const c10::optional<at::Tensor>& gain, double eps, double gamma, bool need_weight,
    bool need_gain, bool need_norm) {
  normfree_native::check_grad_rows(dy, w);
  normfree_native::check_row_stats(mean, n_var, gain, w);
  const int64_t rows = w.size(0), n = w.size(1);
  const bool has_gain = gain.has_value() && gain->defined();
  TORCH_CHECK(need_weight || !need_norm, "the gradient's norm needs the gradient");
  at::Tensor grad_w, grad_gain, grad_norm;
  if (need_weight) grad_w = at::empty_like(w);
  if (need_gain) grad_gain = at::empty({rows}, w.options());
  if (need_norm) grad_norm = at::empty({rows}, w.options());
  normfree_native::dispatch_grad_rows(dy, w, [&](auto g0, auto t0) {
    using G = decltype(g0);
    using T = decltype(t0);
    normfree_native::ws_backward_rows<G, T>(
        dy.data_ptr<G>(), w.data_ptr<T>(), mean.data_ptr<T>(), n_var.data_ptr<T>(),
        has_gain ? gain->data_ptr<T>() : nullptr, need_weight ? grad_w.data_ptr<T>() : nullptr,
        need_gain ? grad_gain.data_ptr<T>() : nullptr,
        need_norm ? grad_norm.data_ptr<T>() : nullptr, rows, n, static_cast<T>(eps),
        static_cast<T>(gamma));
  });
  return {grad_w, grad_gain, grad_norm};
}
