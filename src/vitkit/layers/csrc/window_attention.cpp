// Fused window attention on the CPU: out = softmax(q k^T * scale + bias) v, one (window, head) at a time,
// with the scores of a row kept in L1 instead of a (windows, heads, N, N) tensor in memory; for training,
// the same forward keeping each row's log-sum-exp and a backward that recomputes the scores from it
// (see "backward" below).
//
// Swin's windows are short (N = 49-576 tokens) and many (hundreds per image): torch's fused kernel and
// the explicit bmm / softmax / bmm path both spend most of their time on per-call overhead, 49-wide
// rows and round trips of the score tensor through memory. Here every loop runs over contiguous fp32
// rows the compiler vectorises (built with the CPU's widest vector flags by vitkit.layers.kernels).
//
// q, k, v: (W, H, N, D) views of one projection (equal strides, unit last stride), float32 or bfloat16;
//          returns (W, N, H, D) contiguous in q's dtype, i.e. (W, N, H * D) as the output projection reads it.
// rows:    optional (nW, N) int64: q, k, v are then (B, T, H, D) maps of T tokens per image, window
//          b * nW + n gathers the tokens rows[n] of image b, and the output (B, T, H, D) goes back to the
//          same places: Swin's (shifted) window partition and its inverse without a copy either way.
// bias:    (G, H, N, N) float32, contiguous; window w adds bias[w % G] (G = 1 or the windows per image).
// cosine:  optional (H,) float32: Swin V2's cosine attention, q and k divided by their L2 norms first and
//          head h's scores multiplied by cosine[h] (its clamped, exponentiated logit scale) and scale.
// Accumulation is fp32 throughout; bf16 inputs are widened on load and the result rounded once.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace vitkit_cpu;


// One (window, head) of the work. Tasks are ordered by (bias group g, head, window among those with
// w % G == g), so that a thread runs all the windows sharing one (N, N) bias in a row: the bias is
// padded once for them, and in the backward its gradient is summed in L1 before it is written out.
struct Task {
  int64_t w, h, group;  // group: g * H + h
};

// Where window w's token i and head h live, as element offsets shared by q, k and v (views of one
// projection): token_offset(w, i) + h * head_stride; and where its output goes.
struct Layout {
  int64_t W, H, N, D, G;
  int64_t head_stride, outer_stride, token_stride;  // outer: per window, or per image with `rows`
  const int64_t* rows;                              // (windows per image, N) token indices; nullptr: none
  int64_t windows_per_image, tokens_per_image;

  Task task(int64_t t) const {
    const int64_t per_group = W / G, group = t / per_group;
    return {group / H + (t % per_group) * G, group % H, group};
  }

  // fills off[i] (input) and out_off[i] (output, heads * D per token) for window w's N tokens
  void offsets(int64_t w, int64_t* off, int64_t* out_off) const {
    if (rows == nullptr) {
      for (int64_t i = 0; i < N; ++i) {
        off[i] = w * outer_stride + i * token_stride;
        out_off[i] = (w * N + i) * H * D;
      }
    } else {
      const int64_t b = w / windows_per_image;
      const int64_t* r = rows + (w % windows_per_image) * N;
      for (int64_t i = 0; i < N; ++i) {
        off[i] = b * outer_stride + r[i] * token_stride;
        out_off[i] = (b * tokens_per_image + r[i]) * H * D;
      }
    }
  }
};

// query rows per block: R x (D / L) accumulators stay in registers. AVX-512: 7 where it divides N (Swin's
// 49-token windows: no padded rows) took 0.84-0.98x the time of 4 per call; 4 elsewhere. AVX2 (16
// registers): 3 for head_dim <= 32 and 2 above; at Swin's windows 3 took 0.85-0.95x the time of 2 or 4,
// and at 197 tokens of 64, 2 took 0.8-0.9x the time of 3 or 4 (Zen 1 EPYC, 2 threads).
constexpr int R_MAX = 7;
template <int DV>
constexpr int avx2_rows() {
  return DV * L <= 32 ? 3 : 2;
}

// Key chunks per step of the scores: R rows x U chunks are independent sums, enough of them to hide the
// FMA's latency (~5 dependent cycles at one vector FMA per cycle on the AVX2 CPUs measured) in AVX2's 16
// registers; the AVX-512 builds' 7 or 4 rows cover it with U = 1.
template <int R>
constexpr int score_chunks() {
  if constexpr (L == 8) return R >= 6 ? 1 : (6 + R - 1) / R;
  return 1;
}

// One stage of an L x L transpose held in registers: rows i and i + B (i without bit B) swap the
// lanes whose bit B differs from the row's; after the stages B = L / 2, ..., 2, 1, row r holds column r.
template <int B>
inline void transpose_stage(vf* r, vi lo, vi hi) {
  for (int i = 0; i < L; ++i) {
    if (i & B) continue;
    const vf a = r[i], b = r[i + B];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + B] = __builtin_shuffle(a, b, hi);
  }
}

inline void transpose_tile(vf* r) {
  // lo[c] = c with bit B clear ? a[c] : b[c - B]; hi[c] = c with bit B clear ? a[c + B] : b[c] (b's lanes are L-2L-1)
#if VITKIT_LANES == 8
  transpose_stage<4>(r, vi{0, 1, 2, 3, 8, 9, 10, 11}, vi{4, 5, 6, 7, 12, 13, 14, 15});
  transpose_stage<2>(r, vi{0, 1, 8, 9, 4, 5, 12, 13}, vi{2, 3, 10, 11, 6, 7, 14, 15});
  transpose_stage<1>(r, vi{0, 8, 2, 10, 4, 12, 6, 14}, vi{1, 9, 3, 11, 5, 13, 7, 15});
#else
  transpose_stage<8>(r, vi{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                     vi{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  transpose_stage<4>(r, vi{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                     vi{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  transpose_stage<2>(r, vi{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                     vi{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  transpose_stage<1>(r, vi{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                     vi{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
#endif
}

// one row of D values to fp32
template <typename T, int64_t D>
inline void widen_row(const T* src, float* dst) {
  for (int64_t d = 0; d < D; d += L) storev(dst + d, load_lanes(src + d));
}

// k (N fp32 rows of D, row stride ks) to (D, NP), zero-padded past N: L x L tiles transposed in
// registers
template <int64_t D>
inline void transpose_padded(const float* k, int64_t ks, int64_t N, int64_t NP, float* kt) {
  for (int64_t j0 = 0; j0 < NP; j0 += L)
    for (int64_t d0 = 0; d0 < D; d0 += L) {
      vf r[L];
      for (int t = 0; t < L; ++t) r[t] = j0 + t < N ? load_lanes(k + (j0 + t) * ks + d0) : vf{};
      transpose_tile(r);
      for (int t = 0; t < L; ++t) storev(kt + (d0 + t) * NP + j0, r[t]);
    }
}

// Swin V2's cosine attention: a row divided by its L2 norm (at least 1e-12, as F.normalize), times `gain`
template <int64_t D>
inline void normalize(float* x, float gain) {
  vf sq = {};
  for (int64_t d = 0; d < D; d += L) {
    const vf v = loadv(x + d);
    sq += v * v;
  }
  const float f = gain / std::max(std::sqrt(hsum(sq)), 1e-12f);
  for (int64_t d = 0; d < D; d += L) storev(x + d, loadv(x + d) * f);
}

// Window w's bias for head h, (N, N), into bp as (N, NP) rows padded with -inf (the padded keys get no weight)
inline void pad_bias(const float* bias, const Layout& s, int64_t w, int64_t h, int64_t NP, float* bp) {
  const int64_t N = s.N;
  const float* bh = bias + ((w % s.G) * s.H + h) * N * N;
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < N; ++j) bp[i * NP + j] = bh[i * N + j];
    for (int64_t j = N; j < NP; ++j) bp[i * NP + j] = -std::numeric_limits<float>::infinity();
  }
}

// A row of scores (NC chunks of L) to its softmax numerators exp(x - max), each chunk handed to
// put(c, e) after chunk c is read; returns 1 / their sum
template <typename Put>
inline float softmax_numerators(const float* row, int64_t NC, Put put, float* row_max = nullptr) {
  vf m = loadv(row);
  for (int64_t c = 1; c < NC; ++c) {
    const vf x = loadv(row + c * L);
    m = x > m ? x : m;
  }
  const float top = hmax(m);
  if (row_max) *row_max = top;
  const vf mx = splat(top);
  vf sum = {};
  for (int64_t c = 0; c < NC; ++c) {
    const vf e = exp_nonpositive(loadv(row + c * L) - mx);
    sum += e;
    put(c, e);
  }
  return 1.0f / hsum(sum);
}

// Training: each row's log-sum-exp of its scores, max + log(sum of exp(x - max)), into lse (W, H, N)
// for the backward, which recomputes the probabilities from it
template <int R>
inline void store_lse(float* lse, const Layout& s, int64_t w, int64_t h, int64_t i0, int64_t rows, const float* top,
                      const float* inv) {
  float* out = lse + (w * s.H + h) * s.N + i0;
  for (int64_t r = 0; r < rows; ++r) out[r] = top[r] - std::log(inv[r]);
}

// One (window, head) with head_dim = L * DV. Scratch: kt (D, NP) = k transposed, vb (N, D), bias
// (N, NP) padded with -inf, qb (R, D), sc (R, NP): all fp32; off / out_off: the window's token offsets.
template <typename T, int DV, int R>
void attend(const T* q, const T* k, const T* v, T* out, const Layout& s, int64_t w, int64_t h,
            float scale, const float* cosine, float* kt, float* vb, float* bp, float* qb, float* sc,
            const int64_t* off, const int64_t* out_off, float* lse) {
  constexpr int64_t D = DV * L;
  const int64_t N = s.N, NP = (N + L - 1) / L * L, NC = NP / L;
  const int64_t hs = h * s.head_stride;
  // v, then k, row by row into fp32 (whole rows: many cache misses in flight at once); k is staged in
  // the score buffer (free until the first row block) and transposed from there in registers. At
  // Swin-T's stage 1 in fp32 this took 0.55-0.75x the time of one loop transposing straight from
  // memory, as the compiler vectorised it.
  for (int64_t j = 0; j < N; ++j) widen_row<T, D>(v + off[j] + hs, vb + j * D);
  for (int64_t j = 0; j < N; ++j) widen_row<T, D>(k + off[j] + hs, sc + j * D);
  if (cosine)
    for (int64_t j = 0; j < N; ++j) normalize<D>(sc + j * D, 1.0f);
  transpose_padded<D>(sc, D, N, NP, kt);
  for (int64_t i0 = 0; i0 < N; i0 += R) {
    const int64_t rows = std::min<int64_t>(R, N - i0);
    for (int r = 0; r < R; ++r) {  // a short last block repeats its last row
      const T* qi = q + off[i0 + std::min<int64_t>(r, rows - 1)] + hs;
      if (cosine) {
        widen_row<T, D>(qi, qb + r * D);
        normalize<D>(qb + r * D, cosine[h] * scale);
      } else {
        for (int64_t d = 0; d < D; ++d) qb[r * D + d] = load(qi + d) * scale;
      }
    }
    // scores: R rows x U * L keys per step (U = score_chunks<R>), the reduction over D in registers
    auto scores = [&]<int U>(int64_t c) {
      vf a[R][U] = {};
      for (int64_t d = 0; d < D; ++d)
        for (int u = 0; u < U; ++u) {
          const vf kv = loadv(kt + d * NP + (c + u) * L);
          for (int r = 0; r < R; ++r) a[r][u] += qb[r * D + d] * kv;
        }
      for (int r = 0; r < R; ++r) {
        const int64_t i = i0 + std::min<int64_t>(r, rows - 1);
        for (int u = 0; u < U; ++u)
          storev(sc + r * NP + (c + u) * L, a[r][u] + loadv(bp + i * NP + (c + u) * L));
      }
    };
    constexpr int U = score_chunks<R>();
    int64_t c = 0;
    for (; c + U <= NC; c += U) scores.template operator()<U>(c);
    for (; c < NC; ++c) scores.template operator()<1>(c);
    // softmax numerators in place; 1 / row sum kept for the end
    float inv[R], top[R];
    for (int r = 0; r < R; ++r) {
      float* row = sc + r * NP;
      inv[r] = softmax_numerators(row, NC, [row](int64_t c, vf e) { storev(row + c * L, e); }, top + r);
    }
    if (lse) store_lse<R>(lse, s, w, h, i0, rows, top, inv);
    // out = numerators @ v / row sum: R rows x D in registers
    vf acc[R][DV] = {};
    for (int64_t j = 0; j < N; ++j) {
      vf vj[DV];
      for (int dv = 0; dv < DV; ++dv) vj[dv] = loadv(vb + j * D + dv * L);
      for (int r = 0; r < R; ++r) {
        const float p = sc[r * NP + j];
        for (int dv = 0; dv < DV; ++dv) acc[r][dv] += p * vj[dv];
      }
    }
    for (int r = 0; r < rows; ++r) {
      T* o = out + out_off[i0 + r] + h * D;
      for (int dv = 0; dv < DV; ++dv) {
        const vf x = acc[r][dv] * inv[r];
        store_lanes(o + dv * L, x);
      }
    }
  }
}

#ifdef __AVX512BF16__
// bf16 inputs on a CPU with AVX512_BF16: both products by vdpbf16ps, which multiplies pairs of bf16
// values and adds both products into one fp32 lane, half the instructions of widening to fp32 first.
// q k^T is exact (bf16 x bf16 products fit fp32); the probabilities are rounded to bf16 before the
// product with v, as torch's bf16 attention rounds them. Layouts, as 32-bit words of two bf16:
//   kt2 (D/2, NP): word (e, j) = k[j][2e], k[j][2e+1]  (k's rows, word by word, transposed)
//   vp  (NP/2, D): word (f, d) = v[2f][d], v[2f+1][d]  (two rows of v interleaved)
//   q and the probabilities are read as words of their own rows and broadcast.
inline vf dot2(vf acc, vf a, vf b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(a), reinterpret_cast<const __m512bh&>(b));
}
inline vf bcast_word(const void* p) {
  uint32_t u;
  std::memcpy(&u, p, sizeof u);
  const vi w = vi{} + static_cast<int32_t>(u);
  return reinterpret_cast<const vf&>(w);
}

// N bf16 rows of E words (x + off[j]) to (E, NP) words, zero past N: 16 x 16 word tiles transposed in
// registers (E = 8 * DV words per row: one tile holds 16 rows x 16 words, i.e. D = 32; other D take E / 16
// tiles or a part of one)
inline void transpose_words(const c10::BFloat16* x, const int64_t* off, int64_t N, int64_t NP, int64_t E,
                            uint32_t* out) {
  for (int64_t j0 = 0; j0 < NP; j0 += L)
    for (int64_t e0 = 0; e0 < E; e0 += L) {
      vf r[L];
      for (int t = 0; t < L; ++t) {
        r[t] = vf{};
        if (j0 + t < N) std::memcpy(&r[t], x + off[j0 + t] + 2 * e0, std::min<int64_t>(L, E - e0) * 4);
      }
      transpose_tile(r);
      for (int t = 0; t < L && e0 + t < E; ++t) storev(reinterpret_cast<float*>(out + (e0 + t) * NP + j0), r[t]);
    }
}

template <int DV, int R>
void attend_bf16_dot(const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v, c10::BFloat16* out, const Layout& s, int64_t w, int64_t h, float scale, float* kt, float* vb,
                     float* bp, float* sc, const int64_t* off, const int64_t* out_off, float* lse) {
  constexpr int64_t D = DV * L, E = D / 2;  // E: words per row
  const int64_t N = s.N, NP = (N + L - 1) / L * L, NC = NP / L;
  const int64_t hs = h * s.head_stride;
  // kt2: k's rows, word by word, transposed
  uint32_t* kt2 = reinterpret_cast<uint32_t*>(kt);
  transpose_words(k + hs, off, N, NP, E, kt2);
  // vp: rows 2f and 2f + 1 interleaved, zero past N
  uint32_t* vp = reinterpret_cast<uint32_t*>(vb);
  for (int64_t f = 0; f < NP / 2; ++f) {
    const int64_t j = 2 * f;
    for (int64_t d0 = 0; d0 < D; d0 += L) {
      vh a = {}, b = {};
      if (j < N) std::memcpy(&a, v + off[j] + hs + d0, sizeof a);
      if (j + 1 < N) std::memcpy(&b, v + off[j + 1] + hs + d0, sizeof b);
      const vi word = __builtin_convertvector(a, vi) | (__builtin_convertvector(b, vi) << 16);
      std::memcpy(vp + f * D + d0, &word, sizeof word);
    }
  }
  const vf sv = splat(scale);
  for (int64_t i0 = 0; i0 < N; i0 += R) {
    const int64_t rows = std::min<int64_t>(R, N - i0);
    const c10::BFloat16* qi[R];
    for (int r = 0; r < R; ++r) qi[r] = q + off[i0 + std::min<int64_t>(r, rows - 1)] + hs;
    for (int64_t c = 0; c < NC; ++c) {
      vf a[R] = {};
      for (int64_t e = 0; e < E; ++e) {
        const vf kv = loadv(reinterpret_cast<const float*>(kt2 + e * NP + c * L));
        for (int r = 0; r < R; ++r) a[r] = dot2(a[r], kv, bcast_word(qi[r] + 2 * e));
      }
      for (int r = 0; r < R; ++r) {
        const int64_t i = i0 + std::min<int64_t>(r, rows - 1);
        storev(sc + r * NP + c * L, a[r] * sv + loadv(bp + i * NP + c * L));
      }
    }
    // the numerators, rounded to bf16 in place: row's first NP / 2 words (chunk c's 16 values land in
    // bytes 32c..32c+31, below chunk c's own, which has been read by then)
    float inv[R], top[R];
    for (int r = 0; r < R; ++r) {
      char* row = reinterpret_cast<char*>(sc + r * NP);
      inv[r] = softmax_numerators(
          sc + r * NP, NC,
          [row](int64_t c, vf e) {
            const __m256bh packed = _mm512_cvtneps_pbh(e);
            std::memcpy(row + c * 32, &packed, 32);
          },
          top + r);
    }
    if (lse) store_lse<R>(lse, s, w, h, i0, rows, top, inv);
    vf acc[R][DV] = {};
    for (int64_t f = 0; f < NP / 2; ++f) {
      vf vj[DV];
      for (int dv = 0; dv < DV; ++dv) vj[dv] = loadv(reinterpret_cast<const float*>(vp + f * D + dv * L));
      for (int r = 0; r < R; ++r) {
        const vf pw = bcast_word(reinterpret_cast<const char*>(sc + r * NP) + 4 * f);
        for (int dv = 0; dv < DV; ++dv) acc[r][dv] = dot2(acc[r][dv], vj[dv], pw);
      }
    }
    for (int r = 0; r < rows; ++r) {
      c10::BFloat16* o = out + out_off[i0 + r] + h * D;
      for (int dv = 0; dv < DV; ++dv) {
        const vf x = acc[r][dv] * inv[r];
        store_lanes(o + dv * L, x);
      }
    }
  }
}
#endif

template <typename T, int DV, int R>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
         const std::optional<at::Tensor>& cosine, at::Tensor& out, float* lse, const Layout& s, float scale) {
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const float* bp = bias.const_data_ptr<float>();
  const float* cp = cosine ? cosine->const_data_ptr<float>() : nullptr;
  T* op = out.mutable_data_ptr<T>();
  const int64_t N = s.N, NP = (N + L - 1) / L * L, D = DV * L;
  at::parallel_for(0, s.W * s.H, 1, [&](int64_t begin, int64_t end) {
    // vb: v widened (N, D), or the bf16 path's interleaved pairs (NP / 2, D)
    const int64_t vb_size = std::max(N, NP / 2) * D;
    std::vector<float> scratch(D * NP + vb_size + N * NP + R_MAX * D + std::max(R_MAX * NP, N * D));
    float* kt = scratch.data();
    float* vb = kt + D * NP;
    float* bb = vb + vb_size;
    float* qb = bb + N * NP;
    float* sc = qb + R_MAX * D;
    std::vector<int64_t> offsets(2 * N);
    int64_t group = -1;
    for (int64_t t = begin; t < end; ++t) {
      const Task task = s.task(t);
      s.offsets(task.w, offsets.data(), offsets.data() + N);
      if (task.group != group) {  // a new (bias, head): its bias padded once for all its windows
        group = task.group;
        pad_bias(bp, s, task.w, task.h, NP, bb);
      }
#ifdef __AVX512BF16__
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (cp == nullptr) {  // Swin V2's normalised q and k are fp32 values: the widening path keeps them
          attend_bf16_dot<DV, R>(qp, kp, vp, op, s, task.w, task.h, scale, kt, vb, bb, sc, offsets.data(),
                                 offsets.data() + N, lse);
          continue;
        }
      }
#endif
      attend<T, DV, R>(qp, kp, vp, op, s, task.w, task.h, scale, cp, kt, vb, bb, qb, sc, offsets.data(),
                       offsets.data() + N, lse);
    }
  });
}

// ---- backward --------------------------------------------------------------------------------------
// One (window, head) of the gradient, with S = q k^T * scale + bias and P = exp(S - lse) recomputed
// from the forward's log-sum-exp (nothing of size N x N is kept between the passes):
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = dS K * scale,  dK = dS^T Q * scale,
//   dbias[w % G] += dS.
// R query rows at a time; dK and dV accumulate over the row blocks in fp32 and are rounded once at the end.
// Scratch (fp32): qs, go (N + R, D), their last R rows zero; kr, dk, dv (N, D); kt, vt (D, NP); bp (N + R, NP);
// pb, db (R, NP); delta, lse (N + R); and dbias (N, NP), the gradient of the current (bias, head) summed
// over its windows so far.
struct Grads {
  float* qs; float* go; float* kr; float* dk; float* dv; float* kt; float* vt; float* bp; float* pb; float* db;
  float* delta; float* lse; float* dbias; float* nq; float* nk;
  uint16_t* qh; uint16_t* gh;  // bf16 with AVX512_BF16: q and dO rows as they came, (N + R, D), for vdpbf16ps
};

// Swin V2: x's L2 norm as F.normalize divides by it (at least 1e-12); and the gradient through x / norm of
// the gradient gx of the normalised row xn: (gx - xn (xn . gx)) / norm, or gx / 1e-12 where the floor held
template <int64_t D>
inline float row_norm(const float* x) {
  vf sq = {};
  for (int64_t d = 0; d < D; d += L) sq += loadv(x + d) * loadv(x + d);
  return std::sqrt(hsum(sq));
}
template <int64_t D>
inline void unnormalize_grad(float* gx, const float* xn, float norm) {
  if (norm <= 1e-12f) {
    for (int64_t d = 0; d < D; d += L) storev(gx + d, loadv(gx + d) * 1e12f);
    return;
  }
  vf dot = {};
  for (int64_t d = 0; d < D; d += L) dot += loadv(xn + d) * loadv(gx + d);
  const vf p = splat(hsum(dot)), inv = splat(1.0f / norm);
  for (int64_t d = 0; d < D; d += L) storev(gx + d, (loadv(gx + d) - loadv(xn + d) * p) * inv);
}

// acc[j] += sum_r w[r][j] x[r] for the N keys j: the R rows of x (R, D) stay in registers, w is (R, NP)
template <int DV, int R>
inline void accumulate_keys(const float* w, int64_t NP, const float* x, int64_t N, float* acc) {
  constexpr int64_t D = DV * L;
  vf xr[R][DV];
  for (int r = 0; r < R; ++r)
    for (int dv = 0; dv < DV; ++dv) xr[r][dv] = loadv(x + r * D + dv * L);
  for (int64_t j = 0; j < N; ++j) {
    vf a[DV];
    for (int dv = 0; dv < DV; ++dv) a[dv] = loadv(acc + j * D + dv * L);
    for (int r = 0; r < R; ++r) {
      const float c = w[r * NP + j];
      for (int dv = 0; dv < DV; ++dv) a[dv] += c * xr[r][dv];
    }
    for (int dv = 0; dv < DV; ++dv) storev(acc + j * D + dv * L, a[dv]);
  }
}

template <typename T, int DV, int R>
void attend_backward(const T* q, const T* k, const T* v, const T* o, const T* g, const float* lse, T* dqkv,
                     const Layout& s, int64_t w, int64_t h, float scale, const float* cosine, float* dcosine,
                     const Grads& m, const int64_t* off, const int64_t* out_off) {
  constexpr int64_t D = DV * L;
  const int64_t N = s.N, NP = (N + L - 1) / L * L, NC = NP / L, H = s.H;
  const int64_t hs = h * s.head_stride, hd = h * D;
  // rows in: k as rows (kr) and transposed (kt); v transposed through dv as staging; q scaled; dO.
  // Swin V2 (cosine): q and k normalised first as in the forward, their norms kept for the gradient
  const float mult = cosine ? cosine[h] * scale : scale;  // the scores' multiplier of q . k
  // bf16 on a CPU with AVX512_BF16: q k^T and dO v^T from the bf16 values by vdpbf16ps (exact products,
  // the forward's scores bit for bit), k and v transposed word by word; fp32 copies still feed the rest
  bool words = false;
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<T, c10::BFloat16>) words = cosine == nullptr;
#endif
  for (int64_t j = 0; j < N; ++j) widen_row<T, D>(k + off[j] + hs, m.kr + j * D);
  if (cosine)
    for (int64_t j = 0; j < N; ++j) {
      m.nk[j] = row_norm<D>(m.kr + j * D);
      normalize<D>(m.kr + j * D, 1.0f);
    }
  if (words) {
#ifdef __AVX512BF16__
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      transpose_words(k + hs, off, N, NP, D / 2, reinterpret_cast<uint32_t*>(m.kt));
      transpose_words(v + hs, off, N, NP, D / 2, reinterpret_cast<uint32_t*>(m.vt));
      for (int64_t i = 0; i < N; ++i) {
        std::memcpy(m.qh + i * D, q + off[i] + hs, D * sizeof(uint16_t));
        std::memcpy(m.gh + i * D, g + out_off[i] + hd, D * sizeof(uint16_t));
      }
    }
#endif
  } else {
    transpose_padded<D>(m.kr, D, N, NP, m.kt);
    for (int64_t j = 0; j < N; ++j) widen_row<T, D>(v + off[j] + hs, m.dv + j * D);
    transpose_padded<D>(m.dv, D, N, NP, m.vt);
  }
  std::fill(m.dv, m.dv + N * D, 0.0f);
  std::fill(m.dk, m.dk + N * D, 0.0f);
  for (int64_t i = 0; i < N; ++i) {
    const T* qi = q + off[i] + hs;
    if (cosine) {
      widen_row<T, D>(qi, m.qs + i * D);
      m.nq[i] = row_norm<D>(m.qs + i * D);
      normalize<D>(m.qs + i * D, mult);
    } else {
      for (int64_t d = 0; d < D; d += L) storev(m.qs + i * D + d, load_lanes(qi + d) * scale);
    }
    widen_row<T, D>(g + out_off[i] + hd, m.go + i * D);
    vf acc = {};  // delta_i = dO_i . O_i
    for (int64_t d = 0; d < D; d += L) acc += loadv(m.go + i * D + d) * load_lanes(o + out_off[i] + hd + d);
    m.delta[i] = hsum(acc);
  }
  std::copy(lse + (w * H + h) * N, lse + (w * H + h + 1) * N, m.lse);
  for (int64_t i0 = 0; i0 < N; i0 += R) {
    // this block's R rows, contiguous (past N: zero rows of the padded scratch, whose P and dS are zeroed)
    const int64_t rows = std::min<int64_t>(R, N - i0);
    const float* qb = m.qs + i0 * D;
    const float* gb = m.go + i0 * D;
    // P and dS, L keys at a time: the scores and dP = dO V^T reduce over D in registers
    for (int64_t c = 0; c < NC; ++c) {
      vf sa[R] = {}, ga[R] = {};
      if (words) {  // pairs of bf16 products by vdpbf16ps, the scores scaled after, as in the forward
#ifdef __AVX512BF16__
        const uint16_t* qhb = m.qh + i0 * D;
        const uint16_t* ghb = m.gh + i0 * D;
        const uint32_t* kt2 = reinterpret_cast<const uint32_t*>(m.kt);
        const uint32_t* vt2 = reinterpret_cast<const uint32_t*>(m.vt);
        for (int64_t e = 0; e < D / 2; ++e) {
          const vf kv = loadv(reinterpret_cast<const float*>(kt2 + e * NP + c * L));
          const vf vv = loadv(reinterpret_cast<const float*>(vt2 + e * NP + c * L));
          for (int r = 0; r < R; ++r) {
            sa[r] = dot2(sa[r], kv, bcast_word(qhb + r * D + 2 * e));
            ga[r] = dot2(ga[r], vv, bcast_word(ghb + r * D + 2 * e));
          }
        }
        for (int r = 0; r < R; ++r) sa[r] *= scale;
#endif
      } else {
        for (int64_t d = 0; d < D; ++d) {
          const vf kv = loadv(m.kt + d * NP + c * L), vv = loadv(m.vt + d * NP + c * L);
          for (int r = 0; r < R; ++r) {
            sa[r] += qb[r * D + d] * kv;
            ga[r] += gb[r * D + d] * vv;
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t i = i0 + r;
        const vf x = sa[r] + loadv(m.bp + i * NP + c * L) - m.lse[i];
        const vf p = r < rows ? exp_nonpositive(x) : vf{};  // x <= 0 up to rounding; padded keys: -inf
        storev(m.pb + r * NP + c * L, p);
        storev(m.db + r * NP + c * L, p * (ga[r] - m.delta[i]));
      }
    }
    // dQ = dS K * scale: R rows x D in registers
    vf acc[R][DV] = {};
    for (int64_t j = 0; j < N; ++j) {
      vf kj[DV];
      for (int dv = 0; dv < DV; ++dv) kj[dv] = loadv(m.kr + j * D + dv * L);
      for (int r = 0; r < R; ++r) {
        const float x = m.db[r * NP + j];
        for (int dv = 0; dv < DV; ++dv) acc[r][dv] += x * kj[dv];
      }
    }
    for (int r = 0; r < rows; ++r) {
      T* dq = dqkv + 3 * out_off[i0 + r] + hd;
      if (cosine) {  // acc = dS k^: the logit scale's gradient, then q's through its normalisation
        float gq[D], qn[D];
        vf dot = {};
        for (int dv = 0; dv < DV; ++dv) {
          const vf qh = loadv(qb + r * D + dv * L) * (1.0f / mult);  // q / |q|
          dot += qh * acc[r][dv];
          storev(qn + dv * L, qh);
          storev(gq + dv * L, acc[r][dv] * mult);
        }
        *dcosine += hsum(dot) * scale;
        unnormalize_grad<D>(gq, qn, m.nq[i0 + r]);
        for (int dv = 0; dv < DV; ++dv) store_lanes(dq + dv * L, loadv(gq + dv * L));
      } else {
        for (int dv = 0; dv < DV; ++dv) store_lanes(dq + dv * L, acc[r][dv] * scale);
      }
    }
    accumulate_keys<DV, R>(m.pb, NP, gb, N, m.dv);  // dV += P^T dO
    accumulate_keys<DV, R>(m.db, NP, qb, N, m.dk);  // dK += dS^T (Q * scale)
    for (int r = 0; r < rows; ++r)  // this (bias, head)'s gradient so far, (N, NP)
      for (int64_t c = 0; c < NC; ++c)
        storev(m.dbias + (i0 + r) * NP + c * L, loadv(m.dbias + (i0 + r) * NP + c * L) + loadv(m.db + r * NP + c * L));
  }
  if (cosine)
    for (int64_t j = 0; j < N; ++j) unnormalize_grad<D>(m.dk + j * D, m.kr + j * D, m.nk[j]);
  for (int64_t j = 0; j < N; ++j) {
    T* dk = dqkv + 3 * out_off[j] + H * D + hd;
    T* dv = dk + H * D;
    for (int64_t d = 0; d < D; d += L) store_lanes(dk + d, loadv(m.dk + j * D + d)), store_lanes(dv + d, loadv(m.dv + j * D + d));
  }
}

template <typename T, int DV, int R>
void run_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& grad, const at::Tensor& lse, const at::Tensor& bias, const float* cosine,
                  at::Tensor& dqkv, at::Tensor& dbias, float* dcosine, const Layout& s, float scale) {
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* op = out.const_data_ptr<T>();
  const T* gp = grad.const_data_ptr<T>();
  const float* lp = lse.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  T* dp = dqkv.mutable_data_ptr<T>();
  const int64_t N = s.N, NP = (N + L - 1) / L * L, D = DV * L;
  // The bias gradient sums over the windows that share a (bias, head) group. Tasks run group by group, so
  // a thread writes each group whose tasks all fall in its range straight into dbias (zeroed by the
  // caller); a group split between threads (at most the first and last of a range) is kept aside and
  // added at the end. Memory: a few N x N buffers, whatever the thread count.
  const int threads = at::get_num_threads();
  const int64_t per_group = s.W / s.G;  // tasks per (bias, head) group
  float* dst = dbias.mutable_data_ptr<float>();
  std::vector<std::vector<std::pair<int64_t, std::vector<float>>>> aside(threads);
  std::vector<float> dcos_partial(cosine ? static_cast<size_t>(threads) * s.H : 0, 0.0f);  // per head
  at::parallel_for(0, s.W * s.H, 1, [&](int64_t begin, int64_t end) {
    const int64_t NR = N + R;  // rows of the scratch that blocks read past N
    std::vector<float> scratch(3 * NR * D + 3 * N * D + 2 * D * NP + NR * NP + 2 * R * NP + 4 * NR + N * NP, 0.0f);
    Grads m{};
    m.qs = scratch.data(), m.go = m.qs + NR * D, m.kr = m.go + NR * D, m.dk = m.kr + N * D, m.dv = m.dk + N * D;
    m.kt = m.dv + N * D, m.vt = m.kt + D * NP, m.bp = m.vt + D * NP, m.pb = m.bp + NR * NP, m.db = m.pb + R * NP;
    m.delta = m.db + R * NP, m.lse = m.delta + NR, m.nq = m.lse + NR, m.nk = m.nq + NR, m.dbias = m.nk + NR;
    m.qh = reinterpret_cast<uint16_t*>(m.dbias + N * NP), m.gh = m.qh + NR * D;
    float* dcos_thread = cosine ? dcos_partial.data() + static_cast<size_t>(at::get_thread_num()) * s.H : nullptr;
    auto& kept = aside[at::get_thread_num()];
    auto flush = [&](int64_t group) {  // the summed gradient of one (bias, head) group, out of L1
      float* out = dst + group * N * N;
      if (group * per_group < begin || (group + 1) * per_group > end) {  // shared with another thread
        kept.emplace_back(group, std::vector<float>(N * N));
        out = kept.back().second.data();
      }
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) out[i * N + j] = m.dbias[i * NP + j];
    };
    std::vector<int64_t> offsets(2 * N);
    int64_t group = -1;
    for (int64_t t = begin; t < end; ++t) {
      const Task task = s.task(t);
      s.offsets(task.w, offsets.data(), offsets.data() + N);
      if (task.group != group) {
        if (group >= 0) flush(group);
        group = task.group;
        pad_bias(bp, s, task.w, task.h, NP, m.bp);
        std::fill(m.dbias, m.dbias + N * NP, 0.0f);
      }
      attend_backward<T, DV, R>(qp, kp, vp, op, gp, lp, dp, s, task.w, task.h, scale, cosine,
                                cosine ? dcos_thread + task.h : nullptr, m, offsets.data(), offsets.data() + N);
    }
    if (group >= 0) flush(group);
  });
  for (const auto& kept : aside)
    for (const auto& [group, grad] : kept)
      for (int64_t e = 0; e < N * N; ++e) dst[group * N * N + e] += grad[e];
  if (cosine)
    for (int64_t h = 0; h < s.H; ++h) {
      float x = 0.0f;
      for (int t = 0; t < threads; ++t) x += dcos_partial[static_cast<size_t>(t) * s.H + h];
      dcosine[h] = x;
    }
}

// head_dim / L and the rows per block as template arguments, then `F<T, DV, R>::call(args...)`
template <template <typename, int, int> class F, typename T, typename... Args>
void dispatch(const Layout& s, Args&... args) {
  auto rows = [&]<int DV>() {
#if VITKIT_LANES == 8
    F<T, DV, avx2_rows<DV>()>::call(args...);
#else
    if (s.N % 7 == 0)
      F<T, DV, 7>::call(args...);
    else
      F<T, DV, 4>::call(args...);
#endif
  };
  constexpr int per16 = 16 / L;  // vectors per 16 values of head_dim
  switch (s.D / 16) {
    case 1: return rows.template operator()<per16>();
    case 2: return rows.template operator()<2 * per16>();
    case 3: return rows.template operator()<3 * per16>();
    default: return rows.template operator()<4 * per16>();
  }
}

template <typename T, int DV, int R>
struct Forward {
  template <typename... Args>
  static void call(Args&... args) { run<T, DV, R>(args...); }
};
template <typename T, int DV, int R>
struct Backward {
  template <typename... Args>
  static void call(Args&... args) { run_backward<T, DV, R>(args...); }
};

// Checks the inputs and fills the layout: q, k, v as (windows, heads, N, D) or, with rows, (images,
// tokens, heads, D) maps; the bias (G, heads, N, N); cosine (heads,)
Layout check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& bias, const std::optional<at::Tensor>& rows,
                    const std::optional<at::Tensor>& cosine) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes() && k.strides() == q.strides() &&
                  v.strides() == q.strides(),
              op, ": q, k and v must be 4-D views of one shape and layout");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && bias.device().is_cpu() &&
                  (!rows || rows->device().is_cpu()),
              op, ": CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              op, ": q, k and v must all be float32 or all bfloat16");
  TORCH_CHECK(q.stride(3) == 1, op, ": the head_dim of q, k and v must be contiguous");
  const int64_t D = q.size(3);
  TORCH_CHECK(D % 16 == 0 && D > 0 && D <= 64, op, ": head_dim must be 16, 32, 48 or 64, got ", D);
  Layout s{};
  s.D = D;
  if (!rows) {  // q: (windows, heads, N, D)
    s.W = q.size(0), s.H = q.size(1), s.N = q.size(2);
    s.outer_stride = q.stride(0), s.head_stride = q.stride(1), s.token_stride = q.stride(2);
  } else {  // q: (images, tokens, heads, D), windows gathered by `rows`
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->dim() == 2 &&
                    rows->numel() == q.size(1),
                op, ": rows must be contiguous int64 (windows, N) covering every token once");
    const int64_t* r = rows->const_data_ptr<int64_t>();
    for (int64_t i = 0; i < rows->numel(); ++i)
      TORCH_CHECK(r[i] >= 0 && r[i] < q.size(1), op, ": rows holds a token index out of range");
    s.windows_per_image = rows->size(0), s.tokens_per_image = q.size(1), s.rows = r;
    s.W = q.size(0) * rows->size(0), s.H = q.size(2), s.N = rows->size(1);
    s.outer_stride = q.stride(0), s.token_stride = q.stride(1), s.head_stride = q.stride(2);
  }
  const int64_t H = s.H, N = s.N;
  // with rows, G divides the windows of an image, or each image is one window (G then cycles over images)
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.dim() == 4 && bias.size(1) == H &&
                  bias.size(2) == N && bias.size(3) == N && bias.size(0) > 0 && s.W % bias.size(0) == 0 &&
                  (!rows || rows->size(0) % bias.size(0) == 0 || rows->size(0) == 1),
              op, ": bias must be contiguous float32 (G, heads, N, N) with G dividing the windows");
  s.G = bias.size(0);
  TORCH_CHECK(!cosine || (cosine->device().is_cpu() && cosine->scalar_type() == at::kFloat &&
                          cosine->is_contiguous() && cosine->numel() == H),
              op, ": cosine must be contiguous float32 with one value per head");
  return s;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& bias, double scale,
                                           const std::optional<at::Tensor>& cosine,
                                           const std::optional<at::Tensor>& rows, bool with_lse) {
  const Layout s = check_inputs("window_attention", q, k, v, bias, rows, cosine);
  at::Tensor out = rows ? at::empty({q.size(0), q.size(1), s.H, s.D}, q.options())
                        : at::empty({s.W, s.N, s.H, s.D}, q.options());
  at::Tensor lse = at::empty({with_lse ? s.W : 0, s.H, s.N}, q.options().dtype(at::kFloat));
  float* lp = with_lse ? lse.mutable_data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat)
    dispatch<Forward, float>(s, q, k, v, bias, cosine, out, lp, s, sc);
  else
    dispatch<Forward, c10::BFloat16>(s, q, k, v, bias, cosine, out, lp, s, sc);
  return {out, lse};
}

at::Tensor window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                            double scale, const std::optional<at::Tensor>& cosine,
                            const std::optional<at::Tensor>& rows) {
  return std::get<0>(forward(q, k, v, bias, scale, cosine, rows, false));
}

std::tuple<at::Tensor, at::Tensor> window_attention_lse(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& bias, double scale,
                                                        const std::optional<at::Tensor>& cosine,
                                                        const at::Tensor& rows) {
  return forward(q, k, v, bias, scale, cosine, rows, true);
}

// The gradient of window_attention_lse (map layout): returns dqkv as one (B, T, 3, H, D) tensor in q's
// dtype (q, k, v's gradients side by side, as the qkv projection's output is laid out), dbias (G, H, N, N)
// and, with cosine, its gradient (H,) (else an empty tensor)
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& bias, double scale, const std::optional<at::Tensor>& cosine,
    const at::Tensor& rows) {
  const Layout s = check_inputs("window_attention_backward", q, k, v, bias, rows, cosine);
  const std::vector<int64_t> shape{q.size(0), q.size(1), s.H, s.D};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape) && out.is_contiguous() && out.scalar_type() == q.scalar_type() &&
                  grad.sizes() == at::IntArrayRef(shape) && grad.is_contiguous() && grad.scalar_type() == q.scalar_type(),
              "window_attention_backward: out and grad must be contiguous (B, T, heads, head_dim) in q's dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == s.W * s.H * s.N,
              "window_attention_backward: lse must be the forward's contiguous float32 (windows, heads, N)");
  at::Tensor dqkv = at::empty({q.size(0), q.size(1), 3, s.H, s.D}, q.options());
  at::Tensor dbias = at::zeros(bias.sizes(), bias.options());  // groups split between threads add into it
  at::Tensor dcos = at::empty({cosine ? s.H : 0}, bias.options());
  const float* cp = cosine ? cosine->const_data_ptr<float>() : nullptr;
  float* dcp = cosine ? dcos.mutable_data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat)
    dispatch<Backward, float>(s, q, k, v, out, grad, lse, bias, cp, dqkv, dbias, dcp, s, sc);
  else
    dispatch<Backward, c10::BFloat16>(s, q, k, v, out, grad, lse, bias, cp, dqkv, dbias, dcp, s, sc);
  return {dqkv, dbias, dcos};
}

}  // namespace

TORCH_LIBRARY(vitkit, m) {
  m.def(
      "window_attention(Tensor q, Tensor k, Tensor v, Tensor bias, float scale, Tensor? cosine=None, "
      "Tensor? rows=None) -> Tensor");
  m.def(
      "window_attention_lse(Tensor q, Tensor k, Tensor v, Tensor bias, float scale, Tensor? cosine, Tensor rows) -> "
      "(Tensor, Tensor)");
  m.def(
      "window_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor bias, "
      "float scale, Tensor? cosine, Tensor rows) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitkit, CPU, m) {
  m.impl("window_attention", &window_attention);
  m.impl("window_attention_lse", &window_attention_lse);
  m.impl("window_attention_backward", &window_attention_backward);
}
