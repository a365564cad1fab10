// Row kernels of the CPU KL(p‖q) between two logit rows x, y of length V (float32; the API
// converts bf16/fp16 rows first). p = softmax(x), q = softmax(y).
//   forward:  two passes over the row: the maxima, then the sums. With e = e^(x−max x),
//             f = e^(y−max y), d = (x−max x) − (y−max y): KL = Σe·d/Σe + log1p(Σe·expm1(−d)/Σe),
//             which stays accurate when p ≈ q (KL of 1e-9 and below; log Σf − log Σe would carry
//             ~1e-6 absolute error). p = 0 entries add 0; q = 0 where p > 0 gives +inf.
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
