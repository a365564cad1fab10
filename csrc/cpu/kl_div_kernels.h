// Row kernels of the CPU KL(p‖q) between two logit rows x, y of length V (float32; the API
// converts bf16/fp16 rows first). p = softmax(x), q = softmax(y).
//   forward:  two passes over the row (max, then sums of e^(x−max), e^(y−max) and of
//             e^(x−max)·((x−max_x) − (y−max_y))), so KL = t/s_x − log s_x + log s_y exactly
//             as Σ p (log p − log q), with p = 0 entries contributing 0.
//   backward: one pass: ∂x = g·p·(log p − log q − KL) (log p − log q := 0 where p = 0),
//             ∂y = g·(q − p). grad_x/grad_y may alias x/y (each vector is read before written).
#pragma once

#include <cstdint>

namespace mlan::cpu {

struct KlRowResult {
  float kl, lse_p, lse_q;
};

KlRowResult kl_forward_row(const float* x, const float* y, int64_t vocab);

void kl_backward_row(const float* x, const float* y, int64_t vocab, float grad, float lse_p,
                     float lse_q, float kl, float* grad_x, float* grad_y);

}  // namespace mlan::cpu
