// The passes around a linear layer in training on the CPU, other than its products (oneDNN's):
//
//   gelu_train_(x, s?)                      -> s:  y = x * Phi(x) written over x,  s = dy/dx = Phi(x) + x * phi(x)
//   gelu_backward(grad, s, bias_grad, out?) -> (dx, db): dx = grad * s,  db = column sums of dx (fp32)
//   column_sums(x)                          -> (C,) fp32: the bias gradient of a layer whose output grad is x
// (s and out, where given: buffers to write into, which the caller keeps between steps)
//
// Exact (erf) GELU in one pass that also writes its slope, so the backward is a product instead of a
// second evaluation of erf and exp.
// Phi is the standard normal CDF, phi its density. The backward's column sums are the bias gradient of
// the linear layer before the GELU (its output feeds the GELU), taken while dx is in registers instead of
// in another pass over it; they sum dx as rounded to its dtype. Column sums add in fp32 per fixed block
// of 64 rows, then over blocks in order, so the result does not depend on the number of threads; torch's
// bf16 sum(0) rounds its result to bf16 and ran at about half the speed (Swin-T's shapes, 2 threads).
//
// Phi(x) = (1 + erf(x / sqrt2)) / 2 with erf from Abramowitz & Stegun 7.1.26 (absolute error below
// 1.5e-7), the fit ATen's vectorised erf uses for torch's own GELU; fp32 results are within ~4e-7 of
// float64 and bf16 results within rounding of torch's (tests/test_kernels.py). Inputs: contiguous,
// float32 or bfloat16; outputs in the input's dtype, computed in fp32 and rounded once.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>

#include <immintrin.h>

#include "vec.h"

namespace {

using namespace vitkit_cpu;

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// 1 / a for a >= 1: the 14-bit estimate and one Newton step (~1 ulp), cheaper than a division
inline vf reciprocal(vf a) {
#ifdef __AVX512F__
  const vf r = _mm512_rcp14_ps(a);
  return r * (2.0f - a * r);
#else
  return 1.0f / a;
#endif
}

// y = x Phi(x) and the slope Phi(x) + x phi(x), L lanes at a time. Both need exp(-x^2 / 2): erf's
// fit below is e^(-z^2) times a polynomial, and with z = |x| / sqrt2 that exponential is phi's, so one
// exp serves both.
inline void gelu_parts(vf x, vf& y, vf& slope) {
  const vi sign_mask = vi{} + 0x7FFFFFFF;
  const vi abs_bits = reinterpret_cast<const vi&>(x) & sign_mask;
  const vf z = reinterpret_cast<const vf&>(abs_bits) * kInvSqrt2;  // |x| / sqrt2
  const vf t = reciprocal(1.0f + 0.3275911f * (z > 1e4f ? splat(1e4f) : z));  // bounded: 1 / inf is no estimate
  vf p = splat(1.061405429f);
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const vf e = exp_nonpositive(-(z * z));  // exp(-x^2 / 2)
  const vf half_erfc = 0.5f * (p * t) * e;  // (1 - erf(z)) / 2 = Phi(-|x|)
  const vf cdf = x >= 0.0f ? 1.0f - half_erfc : half_erfc;
  y = x * cdf;
  slope = cdf + x * (e * kInvSqrt2Pi);
}

inline float gelu_scalar(float x, float* slope) {  // the tail of a row: the same lanes, one value used
  vf y, s;
  gelu_parts(splat(x), y, s);
  *slope = s[0];
  return y[0];
}

constexpr int64_t kGrain = 1 << 14;  // elements per task of the forward

template <typename T>
void gelu_forward_impl(const T* x, T* y, T* s, int64_t n) {
  at::parallel_for(0, (n + kGrain - 1) / kGrain, 1, [&](int64_t c0, int64_t c1) {
    const int64_t end = std::min(n, c1 * kGrain);
    int64_t i = c0 * kGrain;
    for (; i + 4 * L <= end; i += 4 * L) {  // four independent vectors in flight: the fit is a serial chain
      vf yv[4], sv[4];
      for (int u = 0; u < 4; ++u) gelu_parts(load_lanes(x + i + u * L), yv[u], sv[u]);
      for (int u = 0; u < 4; ++u) {
        store_lanes(y + i + u * L, yv[u]);
        store_lanes(s + i + u * L, sv[u]);
      }
    }
    for (; i + L <= end; i += L) {
      vf yv, sv;
      gelu_parts(load_lanes(x + i), yv, sv);
      store_lanes(y + i, yv);
      store_lanes(s + i, sv);
    }
    for (; i < end; ++i) {
      float slope;
      store(y + i, gelu_scalar(load(x + i), &slope));
      store(s + i, slope);
    }
  });
}

// the product rounded to T, and its value as rounded (what the column sums add)
inline vf product16(const float* g, const float* s, float* dx) {
  const vf v = loadv(g) * loadv(s);
  storev(dx, v);
  return v;
}
inline vf product16(const c10::BFloat16* g, const c10::BFloat16* s, c10::BFloat16* dx) {
  store_lanes(dx, load_lanes(g) * load_lanes(s));
  return load_lanes(dx);
}

template <typename T>
void gelu_backward_impl(const T* g, const T* s, T* dx, float* sums, int64_t M, int64_t C) {
  by_row_blocks(M, C, sums, [&](int64_t r, float* acc) {
    const int64_t o = r * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const vf v = product16(g + o + c, s + o + c, dx + o + c);
      if (acc != nullptr) storev(acc + c, loadv(acc + c) + v);
    }
    for (; c < C; ++c) {
      store(dx + o + c, load(g + o + c) * load(s + o + c));
      if (acc != nullptr) acc[c] += load(dx + o + c);
    }
  });
}

template <typename T>
void column_sums_impl(const T* x, float* sums, int64_t M, int64_t C) {
  by_row_blocks(M, C, sums, [&](int64_t r, float* acc) {
    const int64_t o = r * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) storev(acc + c, loadv(acc + c) + load_lanes(x + o + c));
    for (; c < C; ++c) acc[c] += load(x + o + c);
  });
}

// `out`, where given: a contiguous tensor of x's shape and dtype to write into (a buffer the caller keeps
// between steps: fresh memory is page-faulted in on every call, which at Swin-T's stage 1 took longer
// than the arithmetic)
at::Tensor output_like(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& out) {
  if (!out.has_value() || !out->defined()) return at::empty_like(x);
  TORCH_CHECK(out->sizes() == x.sizes() && out->scalar_type() == x.scalar_type() && out->is_contiguous() &&
                  out->device().is_cpu(),
              op, ": out must be a contiguous CPU tensor of ", x.sizes(), " ", x.scalar_type(), ", got ", out->sizes(),
              " ", out->scalar_type());
  return *out;
}

// in place: y written over x (fc1's output, which nothing needs once its GELU is taken), one fresh
// tensor fewer per call; returns the slope (in `slope` where given)
at::Tensor gelu_train_(at::Tensor& x, const std::optional<at::Tensor>& slope) {
  check_activation("gelu_train_", "x", x);
  at::Tensor s = output_like("gelu_train_", x, slope);
  if (x.scalar_type() == at::kFloat) {
    gelu_forward_impl(x.data_ptr<float>(), x.data_ptr<float>(), s.data_ptr<float>(), x.numel());
  } else {
    gelu_forward_impl(x.data_ptr<c10::BFloat16>(), x.data_ptr<c10::BFloat16>(), s.data_ptr<c10::BFloat16>(),
                      x.numel());
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor> gelu_backward(const at::Tensor& grad, const at::Tensor& slope, bool bias_grad,
                                                 const std::optional<at::Tensor>& out) {
  check_activation("gelu_backward", "grad", grad);
  check_activation("gelu_backward", "slope", slope);
  TORCH_CHECK(grad.sizes() == slope.sizes() && grad.scalar_type() == slope.scalar_type(),
              "gelu_backward: grad ", grad.sizes(), " ", grad.scalar_type(), " and slope ", slope.sizes(), " ",
              slope.scalar_type(), " must match in shape and dtype");
  TORCH_CHECK(grad.dim() >= 1, "gelu_backward: grad must have at least one dimension");
  const int64_t C = grad.size(-1), M = C == 0 ? 0 : grad.numel() / C;
  at::Tensor dx = output_like("gelu_backward", grad, out);
  TORCH_CHECK(!dx.is_same(grad) && !dx.is_same(slope), "gelu_backward: out must be a tensor of its own");
  const auto f32 = grad.options().dtype(at::kFloat);
  at::Tensor db = at::empty({bias_grad ? C : 0}, f32);
  float* sums = bias_grad ? db.data_ptr<float>() : nullptr;
  if (grad.scalar_type() == at::kFloat) {
    gelu_backward_impl(grad.data_ptr<float>(), slope.data_ptr<float>(), dx.data_ptr<float>(), sums, M, C);
  } else {
    gelu_backward_impl(grad.data_ptr<c10::BFloat16>(), slope.data_ptr<c10::BFloat16>(),
                       dx.data_ptr<c10::BFloat16>(), sums, M, C);
  }
  return {dx, db};
}

at::Tensor column_sums(const at::Tensor& x) {
  check_activation("column_sums", "x", x);
  TORCH_CHECK(x.dim() >= 1, "column_sums: x must have at least one dimension");
  const int64_t C = x.size(-1), M = C == 0 ? 0 : x.numel() / C;
  at::Tensor sums = at::empty({C}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) {
    column_sums_impl(x.data_ptr<float>(), sums.data_ptr<float>(), M, C);
  } else {
    column_sums_impl(x.data_ptr<c10::BFloat16>(), sums.data_ptr<float>(), M, C);
  }
  return sums;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vitkit, m) {
  m.def("gelu_train_(Tensor(a!) x, Tensor(b!)? slope=None) -> Tensor");
  m.def("gelu_backward(Tensor grad, Tensor slope, bool bias_grad, Tensor(a!)? out=None) -> (Tensor, Tensor)");
  m.def("column_sums(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(vitkit, CPU, m) {
  m.impl("gelu_train_", &gelu_train_);
  m.impl("gelu_backward", &gelu_backward);
  m.impl("column_sums", &column_sums);
}
