// Row helpers of normfree's native CPU kernels: sums over one contiguous row with
// kLanes independent partial sums (vectorisable by the compiler, and closer to pairwise
// summation than one running sum), and the argument checks of the kernels' entry points.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>

namespace normfree_native {

constexpr int kLanes = 8;

// The type a row of S is summed and computed in: S itself, or float for a bfloat16 row (the
// upstream gradient of a standardized weight that CPU autocast ran in bfloat16, widened
// exactly: a bfloat16 is the top half of a float).
template <typename S>
struct ComputeOf {
  using type = S;
};
template <>
struct ComputeOf<c10::BFloat16> {
  using type = float;
};
template <typename S>
using compute_t = typename ComputeOf<S>::type;

// A hint to start loading the cache line at p (no fault on any address; a no-op where the
// compiler has no builtin); see kBlock in scaled_ws.h for where it pays.
template <typename T>
inline void prefetch(const T* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

// The next row of a thread's block [.., end) of rows of length n, or the row itself when r is
// the block's last (prefetching a line that is already in cache costs nothing).
template <typename T>
inline const T* next_row(const T* row, int64_t r, int64_t end, int64_t n) {
  return r + 1 < end ? row + n : row;
}

template <typename T>
inline T lane_sum(const T (&acc)[kLanes]) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// sum_i x[i]
template <typename S>
inline compute_t<S> row_sum(const S* x, int64_t n) {
  using T = compute_t<S>;
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<T>(x[i + l]);
  T s = lane_sum(acc);
  for (; i < n; ++i) s += static_cast<T>(x[i]);
  return s;
}

// sum_i (x[i] - mean)^2
template <typename T>
inline T row_centred_square_sum(const T* x, T mean, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const T d = x[i + l] - mean;
      acc[l] += d * d;
    }
  T s = lane_sum(acc);
  for (; i < n; ++i) {
    const T d = x[i] - mean;
    s += d * d;
  }
  return s;
}

// sum_i g[i] * (x[i] - mean). A helper of its own, not a second partial sum in row_sum's loop:
// with two lane arrays in one loop GCC keeps them in memory, and the loop ran 5x slower
// (0.73 against 0.15 ns per element from L1 on a Xeon).
template <typename G, typename T>
inline T row_centred_dot(const G* g, const T* x, T mean, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<T>(g[i + l]) * (x[i + l] - mean);
  T s = lane_sum(acc);
  for (; i < n; ++i) s += static_cast<T>(g[i]) * (x[i] - mean);
  return s;
}

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name,
              " must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64");
}

// One value per row of the weight rows w (a gain, or the forward's mean or N*var): a contiguous
// (rows,) CPU tensor of w's dtype. The kernels read it as a plain array of rows values.
inline void check_row_values(const at::Tensor& t, const at::Tensor& w, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous() && t.size(0) == w.size(0) &&
                  t.scalar_type() == w.scalar_type(),
              name, " must be a contiguous (out,) CPU tensor of the weight's dtype");
}

// The forward's statistics and the optional gain that a backward reads with the weight rows w.
inline void check_row_stats(const at::Tensor& mean, const at::Tensor& n_var,
                            const c10::optional<at::Tensor>& gain, const at::Tensor& w) {
  check_row_values(mean, w, "mean");
  check_row_values(n_var, w, "n_var");
  if (gain.has_value() && gain->defined()) check_row_values(*gain, w, "gain");
}

}  // namespace normfree_native
