// The C++ API of the CPU KL kernels (csrc/cpu/kl_div_kernels.*): op schemas in namespace mlan_C,
// argument checks that name the argument, dtype conversion and the parallel loop over rows.
//
//   mlan_C::kl_div_forward(logits_p, logits_q, mask?) -> (kl, lse_p, lse_q)
//   mlan_C::kl_div_backward(grad_kl, logits_p, logits_q, mask?, lse_p, lse_q, kl) -> (∂p, ∂q)
//   mlan_C::kl_div_backward_inplace(grad_kl, logits_p!, logits_q!, lse_p, lse_q, kl) -> ()
// logits: [T, V] float32 / bfloat16 / float16, element stride 1 (row stride free; in place:
// contiguous); mask: [T] bool (unselected rows: never read, zero results); kl, lse: [T] float32;
// gradients in the logits' dtype. Rows are independent, so results do not depend on threads.
#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kl_div_kernels.h"

namespace mlan {
namespace {

void check_logits(const char* op, const char* name, const at::Tensor& logits, const at::Tensor& like) {
  TORCH_CHECK(logits.dim() == 2, op, ": ", name, " must be 2-D [T, V], got shape ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", logits.device());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(logits.sizes() == like.sizes() && dtype == like.scalar_type(), op, ": ", name,
              " must have logits_p's shape ", like.sizes(), " and dtype ", like.scalar_type(),
              ", got ", logits.sizes(), " ", dtype);
  TORCH_CHECK(logits.size(1) == 0 || logits.stride(1) == 1, op, ": ", name,
              " must have element stride 1 along V, got strides ", logits.strides());
}

void check_rows(const char* op, const char* name, const at::Tensor& tensor, int64_t rows) {
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == rows, op, ": ", name, " must be [T] = [",
              rows, "], got shape ", tensor.sizes());
}

// Rows of `logits` as float: the row itself for float32, else converted into `buffer`.
template <typename scalar_t>
const float* float_row(const scalar_t* row, int64_t vocab, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    buffer.resize(vocab);
    for (int64_t v = 0; v < vocab; ++v) buffer[v] = static_cast<float>(row[v]);
    return buffer.data();
  }
}

template <typename scalar_t>
void store_row(const float* values, int64_t vocab, scalar_t* row) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t v = 0; v < vocab; ++v) row[v] = static_cast<scalar_t>(values[v]);
  }
}

int64_t grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

// Checks logits_p/logits_q and the optional mask [T]; returns the selected-row flags (kept alive
// in `selected`), or nullptr when every row is selected.
const bool* check_inputs(const char* op, const at::Tensor& logits_p, const at::Tensor& logits_q,
                         const std::optional<at::Tensor>& mask, at::Tensor& selected) {
  check_logits(op, "logits_p", logits_p, logits_p);
  check_logits(op, "logits_q", logits_q, logits_p);
  if (!mask.has_value() || !mask->defined()) return nullptr;
  check_rows(op, "mask", *mask, logits_p.size(0));
  selected = mask->to(at::kBool).contiguous();
  return selected.data_ptr<bool>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_forward_cpu(
    const at::Tensor& logits_p, const at::Tensor& logits_q, const std::optional<at::Tensor>& mask) {
  at::Tensor selected;
  const bool* keep = check_inputs("mlan_C::kl_div_forward", logits_p, logits_q, mask, selected);
  const int64_t rows = logits_p.size(0), vocab = logits_p.size(1);
  const auto options = logits_p.options().dtype(at::kFloat);
  at::Tensor kl = at::zeros({rows}, options), lse_p = at::zeros({rows}, options),
             lse_q = at::zeros({rows}, options);
  float *kl_out = kl.data_ptr<float>(), *lse_p_out = lse_p.data_ptr<float>(),
        *lse_q_out = lse_q.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits_p.scalar_type(), "kl_div_forward", [&] {
    const scalar_t *p = logits_p.data_ptr<scalar_t>(), *q = logits_q.data_ptr<scalar_t>();
    const int64_t stride_p = logits_p.stride(0), stride_q = logits_q.stride(0);
    at::parallel_for(0, rows, grain(vocab), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer_p, buffer_q;
      for (int64_t row = begin; row < end; ++row) {
        if (keep != nullptr && !keep[row]) continue;
        const auto result = cpu::kl_forward_row(float_row(p + row * stride_p, vocab, buffer_p),
                                                float_row(q + row * stride_q, vocab, buffer_q), vocab);
        kl_out[row] = result.kl;
        lse_p_out[row] = result.lse_p;
        lse_q_out[row] = result.lse_q;
      }
    });
  });
  return {kl, lse_p, lse_q};
}

// ∂ of Σ_t grad_kl[t]·KL_t into grad_p, grad_q (which may be logits_p, logits_q themselves).
void kl_backward_into(const char* op, const at::Tensor& grad_kl, const at::Tensor& logits_p,
                      const at::Tensor& logits_q, const bool* keep, const at::Tensor& lse_p,
                      const at::Tensor& lse_q, const at::Tensor& kl, at::Tensor& grad_p,
                      at::Tensor& grad_q) {
  const int64_t rows = logits_p.size(0), vocab = logits_p.size(1);
  check_rows(op, "grad_kl", grad_kl, rows);
  check_rows(op, "lse_p", lse_p, rows);
  check_rows(op, "lse_q", lse_q, rows);
  check_rows(op, "kl", kl, rows);
  const at::Tensor grads = grad_kl.to(at::kFloat).contiguous(), lp = lse_p.to(at::kFloat).contiguous(),
                   lq = lse_q.to(at::kFloat).contiguous(), kls = kl.to(at::kFloat).contiguous();
  const float *g = grads.data_ptr<float>(), *lse_p_in = lp.data_ptr<float>(),
              *lse_q_in = lq.data_ptr<float>(), *kl_in = kls.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits_p.scalar_type(), "kl_div_backward", [&] {
    const scalar_t *p = logits_p.data_ptr<scalar_t>(), *q = logits_q.data_ptr<scalar_t>();
    scalar_t *out_p = grad_p.data_ptr<scalar_t>(), *out_q = grad_q.data_ptr<scalar_t>();
    const int64_t stride_p = logits_p.stride(0), stride_q = logits_q.stride(0);
    at::parallel_for(0, rows, grain(vocab), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer_p, buffer_q;
      for (int64_t row = begin; row < end; ++row) {
        scalar_t *row_p = out_p + row * vocab, *row_q = out_q + row * vocab;
        if (keep != nullptr && !keep[row]) {
          std::fill(row_p, row_p + vocab, scalar_t(0));
          std::fill(row_q, row_q + vocab, scalar_t(0));
          continue;
        }
        const float* x = float_row(p + row * stride_p, vocab, buffer_p);
        const float* y = float_row(q + row * stride_q, vocab, buffer_q);
        // float rows are written straight to the output; others through their buffers
        float* gx = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(row_p) : buffer_p.data();
        float* gy = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(row_q) : buffer_q.data();
        cpu::kl_backward_row(x, y, vocab, g[row], lse_p_in[row], lse_q_in[row], kl_in[row], gx, gy);
        store_row(gx, vocab, row_p);
        store_row(gy, vocab, row_q);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> kl_div_backward_cpu(
    const at::Tensor& grad_kl, const at::Tensor& logits_p, const at::Tensor& logits_q,
    const std::optional<at::Tensor>& mask, const at::Tensor& lse_p, const at::Tensor& lse_q,
    const at::Tensor& kl) {
  constexpr const char* op = "mlan_C::kl_div_backward";
  at::Tensor selected;
  const bool* keep = check_inputs(op, logits_p, logits_q, mask, selected);
  at::Tensor grad_p = at::empty(logits_p.sizes(), logits_p.options());
  at::Tensor grad_q = at::empty(logits_q.sizes(), logits_q.options());
  kl_backward_into(op, grad_kl, logits_p, logits_q, keep, lse_p, lse_q, kl, grad_p, grad_q);
  return {grad_p, grad_q};
}

void kl_div_backward_inplace_cpu(const at::Tensor& grad_kl, at::Tensor& logits_p,
                                 at::Tensor& logits_q, const at::Tensor& lse_p,
                                 const at::Tensor& lse_q, const at::Tensor& kl) {
  constexpr const char* op = "mlan_C::kl_div_backward_inplace";
  at::Tensor unused;
  check_inputs(op, logits_p, logits_q, std::nullopt, unused);
  TORCH_CHECK(logits_p.is_contiguous() && logits_q.is_contiguous(), op,
              ": logits_p and logits_q must be contiguous to be overwritten with their gradients");
  kl_backward_into(op, grad_kl, logits_p, logits_q, nullptr, lse_p, lse_q, kl, logits_p, logits_q);
}

}  // namespace
}  // namespace mlan

TORCH_LIBRARY_FRAGMENT(mlan_C, library) {
  library.def("kl_div_forward(Tensor logits_p, Tensor logits_q, Tensor? mask) -> (Tensor kl, "
              "Tensor lse_p, Tensor lse_q)");
  library.def("kl_div_backward(Tensor grad_kl, Tensor logits_p, Tensor logits_q, Tensor? mask, "
              "Tensor lse_p, Tensor lse_q, Tensor kl) -> (Tensor grad_p, Tensor grad_q)");
  library.def("kl_div_backward_inplace(Tensor grad_kl, Tensor(a!) logits_p, Tensor(b!) logits_q, "
              "Tensor lse_p, Tensor lse_q, Tensor kl) -> ()");
}

TORCH_LIBRARY_IMPL(mlan_C, CPU, library) {
  library.impl("kl_div_forward", &mlan::kl_div_forward_cpu);
  library.impl("kl_div_backward", &mlan::kl_div_backward_cpu);
  library.impl("kl_div_backward_inplace", &mlan::kl_div_backward_inplace_cpu);
}
