// ctest: the CPU kernels (raw-pointer interface of mm_adapter.h) against a naive loop in double.
// Shape B=3, L=100, D=40, r=4, E=3, g=2 (D/g = 20 is not a multiple of the SIMD chunk, so the
// padded layout's tails are exercised), dropout 0.25, x rows with a padded batch stride.
// Also: the results with 1 and 2 threads are bitwise equal (N = 300 spans three token chunks). Exit status 0 = pass.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "mm_adapter.h"
#include "philox.h"

namespace {

using Vector = std::vector<float>;

struct Problem {
  mlan::AdapterShape shape;
  mlan::RowStrides strides;  // of x and grad_y
  static constexpr int64_t kSeed = 1234;  // the kernels read it through dropout.seed
  mlan::DropoutConfig dropout = mlan::DropoutConfig::make(0.25, &kSeed);
  double scale = 0.7;
  Vector x, grad_y, down_weight, down_bias, up_weight, up_bias, coef;

  Problem() {
    shape.batch = 3, shape.length = 100, shape.dim = 40, shape.rank = 4, shape.experts = 3,
    shape.groups = 2;
    strides.batch = shape.length * shape.dim + 8;  // a gap after each sample
    strides.token = shape.dim;
    std::mt19937 generator(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto random = [&](int64_t size, float std) {
      Vector values(size);
      for (float& value : values) value = std * normal(generator);
      return values;
    };
    const int64_t rows = shape.batch * strides.batch;
    x = random(rows, 1.0f);
    grad_y = random(rows, 1.0f);
    down_weight = random(shape.rank * shape.dim, 0.2f);
    down_bias = random(shape.rank, 0.1f);
    up_weight = random(shape.experts * shape.dim * shape.rank_per_group(), 0.5f);
    up_bias = random(shape.experts * shape.dim, 0.1f);
    coef = random(shape.batch * shape.experts, 0.5f);
  }

  double x_at(const Vector& activation, int64_t n, int64_t d) const {
    return activation[strides.offset(n, shape.length) + d];
  }
  double up_at(int64_t e, int64_t d, int64_t unit) const {  // dense M_e[d, unit]
    const int64_t per_group = shape.rank_per_group();
    if (unit / per_group != d / shape.dim_per_group()) return 0.0;
    return up_weight[(e * shape.dim + d) * per_group + unit % per_group];
  }
  double keep(int64_t n, int64_t i) const {
    return mlan::dropout_keep(kSeed, dropout.threshold, n, shape.rank, i) ? dropout.keep_scale : 0.0;
  }
};

struct Results {
  Vector y, hidden, grad_x, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias, grad_w;
};

Results run_kernels(const Problem& p) {
  const auto& s = p.shape;
  Results r{Vector(s.tokens() * s.dim), Vector(s.tokens() * s.rank), Vector(s.tokens() * s.dim),
            Vector(s.rank * s.dim), Vector(s.rank), Vector(p.up_weight.size()),
            Vector(p.up_bias.size()), Vector(s.batch * s.experts)};
  mlan::ForwardArgs forward;
  forward.shape = s, forward.dropout = p.dropout, forward.x = p.x.data(), forward.x_strides = p.strides;
  forward.down_weight = p.down_weight.data(), forward.down_bias = p.down_bias.data();
  forward.up_weight = p.up_weight.data(), forward.up_bias = p.up_bias.data(), forward.coef = p.coef.data();
  forward.y = r.y.data(), forward.hidden = r.hidden.data();
  mlan::forward_cpu(forward);

  std::vector<char> workspace(mlan::backward_workspace_bytes_cpu(s, mlan::ScalarType::Float32) + 64);
  mlan::BackwardArgs backward;
  backward.shape = s, backward.dropout = p.dropout, backward.scale = p.scale;
  backward.grad_y = p.grad_y.data(), backward.grad_y_strides = p.strides;
  backward.x = p.x.data(), backward.x_strides = p.strides, backward.hidden = r.hidden.data();
  backward.down_weight = p.down_weight.data(), backward.up_weight = p.up_weight.data();
  backward.up_bias = p.up_bias.data(), backward.coef = p.coef.data();
  backward.workspace = workspace.data() + (64 - reinterpret_cast<uintptr_t>(workspace.data()) % 64) % 64;
  backward.grad_x = r.grad_x.data(), backward.grad_down_weight = r.grad_down_weight.data();
  backward.grad_down_bias = r.grad_down_bias.data(), backward.grad_up_weight = r.grad_up_weight.data();
  backward.grad_up_bias = r.grad_up_bias.data(), backward.grad_routing_weights = r.grad_w.data();
  mlan::backward_cpu(backward);
  return r;
}

// The design doc's formulas, one element at a time, in double.
Results run_naive(const Problem& p) {
  const auto& s = p.shape;
  const int64_t N = s.tokens(), D = s.dim, R = s.rank, E = s.experts, G = s.rank_per_group();
  std::vector<double> h(N * R), y(N * D), gx(N * D), gdw(R * D), gdb(R), gum(E * D * G),
      gub(E * D), gw(s.batch * E), dh(N * R);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> coef(p.coef.begin() + n / s.length * E, p.coef.begin() + (n / s.length + 1) * E);
    for (int64_t i = 0; i < R; ++i) {
      double value = p.down_bias[i];
      for (int64_t d = 0; d < D; ++d) value += p.x_at(p.x, n, d) * p.down_weight[i * D + d];
      h[n * R + i] = value * p.keep(n, i);
    }
    std::vector<double> grad_hidden(R, 0.0);
    for (int64_t d = 0; d < D; ++d) {
      const double g = p.x_at(p.grad_y, n, d);
      double mixed = 0.0;
      for (int64_t e = 0; e < E; ++e) {
        double expert = p.up_bias[e * D + d];
        for (int64_t i = 0; i < R; ++i) {
          expert += h[n * R + i] * p.up_at(e, d, i);
          grad_hidden[i] += coef[e] * g * p.up_at(e, d, i);
          if (i / G == d / s.dim_per_group()) gum[(e * D + d) * G + i % G] += coef[e] * h[n * R + i] * g;
          gw[n / s.length * E + e] += p.scale * g * p.up_at(e, d, i) * h[n * R + i];
        }
        mixed += coef[e] * expert;
        gub[e * D + d] += coef[e] * g;
        gw[n / s.length * E + e] += p.scale * g * p.up_bias[e * D + d];
      }
      y[n * D + d] = p.x_at(p.x, n, d) + mixed;
    }
    for (int64_t i = 0; i < R; ++i) {
      dh[n * R + i] = grad_hidden[i] * p.keep(n, i);
      gdb[i] += dh[n * R + i];
      for (int64_t d = 0; d < D; ++d) gdw[i * D + d] += dh[n * R + i] * p.x_at(p.x, n, d);
    }
    for (int64_t d = 0; d < D; ++d) {
      double value = p.x_at(p.grad_y, n, d);
      for (int64_t i = 0; i < R; ++i) value += dh[n * R + i] * p.down_weight[i * D + d];
      gx[n * D + d] = value;
    }
  }
  auto to_float = [](const std::vector<double>& values) { return Vector(values.begin(), values.end()); };
  return {to_float(y), to_float(h), to_float(gx), to_float(gdw), to_float(gdb), to_float(gum),
          to_float(gub), to_float(gw)};
}

int compare(const char* name, const Vector& actual, const Vector& expected, bool bitwise) {
  if (actual.size() != expected.size()) {
    std::printf("FAILED  %-18s size %zu, expected %zu\n", name, actual.size(), expected.size());
    return 1;
  }
  double worst = 0.0, scale = 1e-6;
  for (float value : expected) scale = std::max(scale, std::fabs(static_cast<double>(value)));
  for (size_t i = 0; i < expected.size(); ++i)
    worst = std::max(worst, std::fabs(static_cast<double>(actual[i]) - expected[i]) / scale);
  const bool ok = bitwise ? worst == 0.0 : worst < 1e-5;
  std::printf("%-7s %-18s max relative error %.2e\n", ok ? "ok" : "FAILED", name, worst);
  return ok ? 0 : 1;
}

int compare_all(const char* label, const Results& a, const Results& b, bool bitwise) {
  std::printf("-- %s\n", label);
  return compare("y", a.y, b.y, bitwise) + compare("hidden", a.hidden, b.hidden, bitwise) +
         compare("grad_x", a.grad_x, b.grad_x, bitwise) +
         compare("grad_down_weight", a.grad_down_weight, b.grad_down_weight, bitwise) +
         compare("grad_down_bias", a.grad_down_bias, b.grad_down_bias, bitwise) +
         compare("grad_up_weight", a.grad_up_weight, b.grad_up_weight, bitwise) +
         compare("grad_up_bias", a.grad_up_bias, b.grad_up_bias, bitwise) +
         compare("grad_routing", a.grad_w, b.grad_w, bitwise);
}

}  // namespace

int main() {
  const Problem problem;
  at::set_num_threads(1);
  const Results one_thread = run_kernels(problem);
  at::set_num_threads(2);
  const Results two_threads = run_kernels(problem);
  const int failures = compare_all("kernels vs naive loop", two_threads, run_naive(problem), false) +
                       compare_all("1 thread vs 2 threads (bitwise)", one_thread, two_threads, true);
  std::printf("%s\n", failures == 0 ? "PASSED" : "FAILED");
  return failures == 0 ? 0 : 1;
}
