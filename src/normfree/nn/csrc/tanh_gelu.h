// tanh-GELU on CPU (Hendrycks & Gimpel 2016, eq. for the tanh approximation; the official NFNets'
// jax.nn.gelu, approximate=True, Brock et al. 2021b), float32, one pass over the elements:
//   y = 0.5 x (1 + tanh u),  u = c (x + a x^3),  c = sqrt(2 / pi),  a = 0.044715,
// through 0.5 (1 + tanh u) = sigmoid(2u) = s, with one exponential e = exp(-|2u|):
//   s = (u < 0 ? e : 1) / (1 + e)                      (no cancellation on either side)
//   dy/dx = s + x s (1 - s) du,  s (1 - s) = e / (1 + e)^2,  du = 2c (1 + 3a x^2).
//
// PyTorch's own kernel for gelu(approximate="tanh") evaluates a vectorised tanh per element and
// its backward a second one: on a 2-core x86 CPU the forward takes 3-4x the time of the erf
// GELU's and the backward about 2x (docs/benchmarks.md, seventeenth pass). Here
// the exponential is a Cody-Waite reduction and a degree-6 polynomial (about 1 ulp) that the
// compiler vectorises: one read and one write per element forward, two reads and one write
// backward. -fno-trapping-math (normfree.nn.native's flags) lets GCC vectorise the selects;
// on x86-64 GCC also builds AVX2 and AVX-512 clones, picked at load time by the CPU.
// Compiled in kernels.cpp, its entry points declared in ops.h (normfree.nn.native builds it).
#pragma once

#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <cstring>

// (GCC 12 on: older GCC rejects the arch=x86-64-vN names in target_clones; the clones are
// ifuncs, which glibc provides)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__GLIBC__)
#define NORMFREE_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NORMFREE_VECTOR_CLONES
#endif

namespace normfree_native {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;
constexpr int64_t kElementGrain = 32768;  // elements per task, as ATen's elementwise kernels

// exp(t) for t <= 0; 0 from t = -87.68 on (n = -127), below float's normal range.
inline float exp_nonpositive(float t) {
  // then n = -127, a zero scale below; NaN too (no undefined float-to-int cast; a NaN input
  // stays NaN through the factor x of the callers)
  t = __builtin_isgreaterequal(t, -88.0f) ? t : -88.0f;
  const float n = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(t / ln 2)
  float r = t - n * 0.693359375f;  // t - n ln 2, ln 2 in two parts (Cody-Waite)
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;  // exp(r) - 1 - r over |r| <= ln(2)/2 (minimax, Cephes' expf)
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, +0 for n = -127
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

NORMFREE_VECTOR_CLONES
inline void tanh_gelu_forward_span(const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float u2 = 2.0f * kGeluC * (v + kGeluA * v * v * v);
    const bool negative = __builtin_isless(u2, 0.0f);
    const float e = exp_nonpositive(negative ? u2 : -u2);
    y[i] = v * ((negative ? e : 1.0f) / (1.0f + e));
  }
}

NORMFREE_VECTOR_CLONES
inline void tanh_gelu_backward_span(const float* __restrict g, const float* __restrict x,
                                    float* __restrict dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float v2 = v * v;
    const float u2 = 2.0f * kGeluC * (v + kGeluA * v2 * v);
    const bool negative = __builtin_isless(u2, 0.0f);
    const float e = exp_nonpositive(negative ? u2 : -u2);
    const float q = 1.0f / (1.0f + e);
    const float du = 2.0f * kGeluC * (1.0f + 3.0f * kGeluA * v2);
    dx[i] = g[i] * ((negative ? e : 1.0f) * q + v * (e * q * q) * du);
  }
}

inline void check_dense_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat &&
                  t.is_non_overlapping_and_dense() && !t.is_neg(),
              name, " must be a dense float32 CPU tensor (no negative view)");
}

}  // namespace normfree_native

// y = tanh-GELU(x), with x's layout (any dense one: NCHW, channels-last, ...).
at::Tensor tanh_gelu_forward(const at::Tensor& x) {
  normfree_native::check_dense_float(x, "x");
  auto y = at::empty_like(x);  // the same strides for a dense input
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), normfree_native::kElementGrain, [&](int64_t begin, int64_t end) {
    normfree_native::tanh_gelu_forward_span(xp + begin, yp + begin, end - begin);
  });
  return y;
}

// dL/dx = g * tanh-GELU'(x), for an upstream gradient g laid out as x.
at::Tensor tanh_gelu_backward(const at::Tensor& g, const at::Tensor& x) {
  normfree_native::check_dense_float(x, "x");
  normfree_native::check_dense_float(g, "grad");
  TORCH_CHECK(g.sizes() == x.sizes() && g.strides() == x.strides(),
              "grad must have x's sizes and strides");
  auto dx = at::empty_like(x);
  const float* gp = g.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, x.numel(), normfree_native::kElementGrain, [&](int64_t begin, int64_t end) {
    normfree_native::tanh_gelu_backward_span(gp + begin, xp + begin, dp + begin, end - begin);
  });
  return dx;
}
