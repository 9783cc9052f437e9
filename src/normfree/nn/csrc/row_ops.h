// Row helpers of normfree's native CPU kernels: sums over one contiguous row with
// kLanes independent partial sums (vectorisable by the compiler, and closer to pairwise
// summation than one running sum), and the argument checks of the kernels' entry points.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace normfree_native {

constexpr int kLanes = 8;

template <typename T>
inline T lane_sum(const T (&acc)[kLanes]) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// sum_i x[i]
template <typename T>
inline T row_sum(const T* x, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l];
  T s = lane_sum(acc);
  for (; i < n; ++i) s += x[i];
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

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name,
              " must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64");
}

}  // namespace normfree_native
