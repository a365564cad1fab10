// CPU KL row kernels (see kl_div_kernels.h): 8 floats per step on the SIMD vectors of simd.h,
// the last partial vector padded with −inf (e^−inf = 0, so padding adds nothing).
#include "kl_div_kernels.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "simd.h"
#include "vec_exp.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mlan::cpu {
namespace {

constexpr int64_t kStep = kVecLanes<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Vector `start` of a row: 8 values, −inf past the end.
MLAN_ALWAYS_INLINE Vec<float> load_padded(const float* row, int64_t start, int64_t vocab) {
  if (start + kStep <= vocab) return load_vec(row + start);
  float lanes[kStep];
  for (int64_t v = 0; v < kStep; ++v) lanes[v] = start + v < vocab ? row[start + v] : kNegInf;
  return load_vec(lanes);
}

MLAN_ALWAYS_INLINE void store_partial(float* row, int64_t start, int64_t vocab, Vec<float> value) {
  if (start + kStep <= vocab) {
    store_vec(row + start, value);
    return;
  }
  for (int64_t v = 0; start + v < vocab; ++v) row[start + v] = value[v];
}

MLAN_ALWAYS_INLINE float horizontal_max(Vec<float> value) {
  float best = value[0];
  for (int64_t v = 1; v < kStep; ++v) best = value[v] > best ? value[v] : best;
  return best;
}

}  // namespace

MLAN_CPU_CLONES KlRowResult kl_forward_row(const float* x, const float* y, int64_t vocab) {
  Vec<float> max_x = splat(kNegInf), max_y = splat(kNegInf);
  for (int64_t start = 0; start < vocab; start += kStep) {
    const Vec<float> xv = load_padded(x, start, vocab), yv = load_padded(y, start, vocab);
    max_x = xv > max_x ? xv : max_x;
    max_y = yv > max_y ? yv : max_y;
  }
  const float mx = horizontal_max(max_x), my = horizontal_max(max_y);
  // With e = e^(x−mx), f = e^(y−my), d = (x−mx) − (y−my) (small when q ≈ p up to a shift):
  //   KL = Σe·d / Σe + log(Σf / Σe),   Σf − Σe = Σ e·expm1(−d)   (f itself where e = 0),
  // so log(Σf / Σe) = log1p(D / Σe) keeps its relative accuracy when p ≈ q, instead of the
  // ~1e-6 absolute error of log Σf − log Σe.
  Vec<float> sum_x = {}, sum_y = {}, weighted = {}, differences = {};
  for (int64_t start = 0; start < vocab; start += kStep) {
    const Vec<float> sx = load_padded(x, start, vocab) - mx, sy = load_padded(y, start, vocab) - my;
    const Vec<float> ex = exp_vec(sx), ey = exp_vec(sy), d = sx - sy;
    const VecInt supported = ex > splat(0.0f);
    const VecInt small = (d < splat(0.5f)) & (d > splat(-0.5f));
    sum_x += ex;
    sum_y += ey;
    weighted += supported ? ex * d : splat(0.0f);
    // ey − ex = ex·expm1(−d): by the series where |d| < 0.5, where the subtraction would cancel
    differences += supported ? (small ? ex * expm1_small(-d) : ey - ex) : ey;
  }
  const float s_x = horizontal_sum<float>(sum_x), s_y = horizontal_sum<float>(sum_y);
  return {horizontal_sum<float>(weighted) / s_x + std::log1p(horizontal_sum<float>(differences) / s_x),
          mx + std::log(s_x), my + std::log(s_y)};
}

MLAN_CPU_CLONES void kl_backward_row(const float* x, const float* y, int64_t vocab, float grad,
                                     float lse_p, float lse_q, float kl, float* grad_x,
                                     float* grad_y) {
  for (int64_t start = 0; start < vocab; start += kStep) {
    const Vec<float> log_p = load_padded(x, start, vocab) - lse_p;
    const Vec<float> log_q = load_padded(y, start, vocab) - lse_q;
    const Vec<float> p = exp_vec(log_p), q = exp_vec(log_q);
    const Vec<float> diff = p > splat(0.0f) ? log_p - log_q : splat(0.0f);
    store_partial(grad_x, start, vocab, grad * p * (diff - kl));
    store_partial(grad_y, start, vocab, grad * (q - p));
  }
}

}  // namespace mlan::cpu

#pragma GCC diagnostic pop
