// LayerNorm over the last dimension on the CPU, forward and backward, for bf16 activations:
//
//   layer_norm_forward(x, weight?, bias?, eps)          -> (y, mean, rstd)
//   layer_norm_backward(grad, x, mean, rstd, weight?, param_grads) -> (dx, dweight_and_dbias)
//
// x, grad: (..., C) contiguous, float32 or bfloat16; weight, bias: (C,) float32 or absent; mean, rstd: one
// fp32 value per row. y = (x - mean) * rstd * weight + bias with mean and the (biased) variance taken in
// fp32 over the row, two passes (the row stays in L1), rounded once to x's dtype.
// The backward, with xh = (x - mean) * rstd and gw = grad * weight:
//   dx = rstd * (gw - mean(gw) - xh * mean(gw * xh)),   dweight = sum over rows of grad * xh,   dbias = sum of grad
// the last two (2C floats, fp32) summed per block of rows while the row is in registers.
//
// Why not torch's: its CPU kernel spends most of its time per row (Swin's rows are 96-768 wide): at
// Swin-T's stage 1 (8 x 3136 x 96, bf16, 2 threads) its forward took ~1.2 ms and forward + backward
// ~3.2 ms, where reading and writing the tensors once takes a tenth of that.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "vec.h"

namespace {

using namespace vitkit_cpu;

template <typename T>
inline float row_sum(const T* x, int64_t C) {
  vf s = {};
  int64_t c = 0;
  for (; c + L <= C; c += L) s += load_lanes(x + c);
  float t = hsum(s);
  for (; c < C; ++c) t += load(x + c);
  return t;
}

template <typename T, bool Affine>
void forward_impl(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, int64_t M,
                  int64_t C, float eps) {
  const float inv_c = 1.0f / C;
  by_row_blocks(M, C, nullptr, [=](int64_t r, float*) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    const float mu = row_sum(xr, C) * inv_c;
    const vf m = splat(mu);
    vf q = {};
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const vf d = load_lanes(xr + c) - m;
      q += d * d;
    }
    float var = hsum(q);
    for (; c < C; ++c) var += (load(xr + c) - mu) * (load(xr + c) - mu);
    const float rs = 1.0f / std::sqrt(var * inv_c + eps);
    mean[r] = mu;
    rstd[r] = rs;
    const vf s = splat(rs);
    for (c = 0; c + L <= C; c += L) {
      const vf v = (load_lanes(xr + c) - m) * s;
      store_lanes(yr + c, Affine ? v * loadv(w + c) + loadv(b + c) : v);
    }
    for (; c < C; ++c) {
      const float v = (load(xr + c) - mu) * rs;
      store(yr + c, Affine ? v * w[c] + b[c] : v);
    }
  });
}

template <typename T>
void forward_rows(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, int64_t M, int64_t C,
                  float eps) {
  if (w != nullptr && b != nullptr) {
    forward_impl<T, true>(x, w, b, y, mean, rstd, M, C, eps);
  } else {
    TORCH_CHECK(w == nullptr && b == nullptr, "layer_norm_forward: pass both weight and bias, or neither");
    forward_impl<T, false>(x, w, b, y, mean, rstd, M, C, eps);
  }
}

// sums: (2C,) dweight then dbias, or nullptr
template <typename T, bool Weighted, bool Sums>
void backward_impl(const T* g, const T* x, const float* mean, const float* rstd, const float* w, T* dx,
                   float* sums, int64_t M, int64_t C) {
  const float inv_c = 1.0f / C;
  by_row_blocks(M, 2 * C, sums, [=](int64_t r, float* acc) {
    const T* gr = g + r * C;
    const T* xr = x + r * C;
    T* dr = dx + r * C;
    const float mu = mean[r], rs = rstd[r];
    const vf m = splat(mu), s = splat(rs);
    // mean(gw) and mean(gw * xh), gw = grad * weight; the sums of grad * xh and grad for the parameters
    vf a = {}, bsum = {};
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const vf gv = load_lanes(gr + c), xh = (load_lanes(xr + c) - m) * s;
      const vf gw = Weighted ? gv * loadv(w + c) : gv;
      a += gw;
      bsum += gw * xh;
      if (Sums) {
        storev(acc + c, loadv(acc + c) + gv * xh);
        storev(acc + C + c, loadv(acc + C + c) + gv);
      }
    }
    float sa = hsum(a), sb = hsum(bsum);
    for (; c < C; ++c) {
      const float gv = load(gr + c), xh = (load(xr + c) - mu) * rs, gw = Weighted ? gv * w[c] : gv;
      sa += gw;
      sb += gw * xh;
      if (Sums) {
        acc[c] += gv * xh;
        acc[C + c] += gv;
      }
    }
    const float ma = sa * inv_c, mb = sb * inv_c;
    const vf va = splat(ma), vb = splat(mb);
    for (c = 0; c + L <= C; c += L) {
      const vf gv = load_lanes(gr + c), xh = (load_lanes(xr + c) - m) * s;
      const vf gw = Weighted ? gv * loadv(w + c) : gv;
      store_lanes(dr + c, s * (gw - va - xh * vb));
    }
    for (; c < C; ++c) {
      const float gv = load(gr + c), xh = (load(xr + c) - mu) * rs, gw = Weighted ? gv * w[c] : gv;
      store(dr + c, rs * (gw - ma - xh * mb));
    }
  });
}

template <typename T>
void backward_rows(const T* g, const T* x, const float* mean, const float* rstd, const float* w, T* dx, float* sums,
                   int64_t M, int64_t C) {
  if (w != nullptr) {
    if (sums != nullptr) backward_impl<T, true, true>(g, x, mean, rstd, w, dx, sums, M, C);
    else backward_impl<T, true, false>(g, x, mean, rstd, w, dx, sums, M, C);
  } else {
    if (sums != nullptr) backward_impl<T, false, true>(g, x, mean, rstd, w, dx, sums, M, C);
    else backward_impl<T, false, false>(g, x, mean, rstd, w, dx, sums, M, C);
  }
}

const float* check_param(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t C) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 1 &&
                  t->size(0) == C,
              op, ": ", name, " must be a contiguous float32 CPU tensor of ", C, " values, got ", t->scalar_type(),
              " ", t->sizes());
  return t->data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias, double eps) {
  check_activation("layer_norm_forward", "x", x);
  TORCH_CHECK(x.dim() >= 1, "layer_norm_forward: x must have at least one dimension");
  const int64_t C = x.size(-1), M = C == 0 ? 0 : x.numel() / C;
  TORCH_CHECK(C > 0, "layer_norm_forward: the normalised dimension is empty");
  const float* w = check_param("layer_norm_forward", "weight", weight, C);
  const float* b = check_param("layer_norm_forward", "bias", bias, C);
  at::Tensor y = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({M}, f32), rstd = at::empty({M}, f32);
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat) {
    forward_rows(x.data_ptr<float>(), w, b, y.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), M, C, e);
  } else {
    forward_rows(x.data_ptr<c10::BFloat16>(), w, b, y.data_ptr<c10::BFloat16>(), mean.data_ptr<float>(),
                 rstd.data_ptr<float>(), M, C, e);
  }
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                       const std::optional<at::Tensor>& weight, bool param_grads) {
  check_activation("layer_norm_backward", "grad", grad);
  check_activation("layer_norm_backward", "x", x);
  TORCH_CHECK(x.dim() >= 1, "layer_norm_backward: x must have at least one dimension");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "layer_norm_backward: grad ",
              grad.sizes(), " and x ", x.sizes(), " must match in shape and dtype");
  const int64_t C = x.size(-1), M = C == 0 ? 0 : x.numel() / C;
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.is_contiguous() &&
                  rstd.is_contiguous() && mean.numel() == M && rstd.numel() == M,
              "layer_norm_backward: mean and rstd must be contiguous float32 with one value per row (", M, ")");
  const float* w = check_param("layer_norm_backward", "weight", weight, C);
  at::Tensor dx = at::empty_like(x);
  at::Tensor sums = at::empty({param_grads ? 2 * C : 0}, x.options().dtype(at::kFloat));
  float* s = param_grads ? sums.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    backward_rows(grad.data_ptr<float>(), x.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), w,
                  dx.data_ptr<float>(), s, M, C);
  } else {
    backward_rows(grad.data_ptr<c10::BFloat16>(), x.data_ptr<c10::BFloat16>(), mean.data_ptr<float>(),
                  rstd.data_ptr<float>(), w, dx.data_ptr<c10::BFloat16>(), s, M, C);
  }
  return {dx, sums};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vitkit, m) {
  m.def("layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, bool param_grads) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitkit, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward);
  m.impl("layer_norm_backward", &layer_norm_backward);
}
