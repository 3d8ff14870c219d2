// Helpers shared by vitkit's CPU kernels: bf16 <-> fp32 conversion, fp32 vectors of one register in GCC's
// generic vector types (16 lanes in the AVX-512 builds, 8 in the AVX2 one), exp for
// non-positive arguments, rows in blocks over the threads with column sums, and the inputs' checks.
// Included by each kernel source; vitkit.layers.kernels hashes this header with the sources, so a change
// here rebuilds them.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <memory>

#include <cstdint>
#include <cstring>

namespace vitkit_cpu {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  if (f != f) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float load(const float* p) { return *p; }
inline float load(const c10::BFloat16* p) { return bf16_to_float(p->x); }
inline void store(float* p, float v) { *p = v; }
inline void store(c10::BFloat16* p, float v) { p->x = float_to_bf16(v); }

// L fp32 lanes: one register of the build's widest vector unit. As two AVX2 registers, 16-lane vectors made
// GCC take their shuffles (the transposes, the lane reductions) lane by lane: the AVX2 build's window
// attention took 1.2-5x torch's time with them (docs/PERFORMANCE.md items 20 and 23).
#ifdef __AVX512F__
#define VITKIT_LANES 16
#else
#define VITKIT_LANES 8
#endif
constexpr int L = VITKIT_LANES;
typedef float vf __attribute__((vector_size(4 * VITKIT_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * VITKIT_LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * VITKIT_LANES)));

inline vf splat(float x) { return vf{} + x; }
inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// exp(x) for x <= 0 (scores minus their row maximum), L lanes at a time: Cody-Waite range reduction
// to r in [-ln2/2, ln2/2], Cephes' expf polynomial (~1 ulp), and 2^n put together from its bits.
// Inputs below -87 (the padding's -inf included) give exp(-87) ~ 1.6e-38: zero next to the row
// maximum's exp(0) = 1. NaN stays NaN (the comparison keeps it), so a NaN score reaches the output
// as it does through torch's softmax.
inline vf exp_nonpositive(vf x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * reinterpret_cast<const vf&>(bits);
}

// across the L lanes, as a tree (log2 L dependent steps where a lane-by-lane loop makes L - 1)
template <typename Op>
inline float reduce_lanes(vf v, Op op) {
#if VITKIT_LANES == 16
  v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
#else
  v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
#endif
  return v[0];
}
inline float hmax(vf v) {
  return reduce_lanes(v, [](vf a, vf b) { return a > b ? a : b; });
}
inline float hsum(vf v) {
  return reduce_lanes(v, [](vf a, vf b) { return a + b; });
}

// L values from memory as fp32 lanes (bf16: its bits are the top half of the fp32's)
inline vf load_lanes(const float* p) { return loadv(p); }
inline vf load_lanes(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vi bits = __builtin_convertvector(h, vi) << 16;
  return reinterpret_cast<const vf&>(bits);
}

// L fp32 lanes to memory (bf16: rounded to nearest even, NaN kept a NaN, as float_to_bf16)
inline void store_lanes(float* p, vf x) { storev(p, x); }
inline void store_lanes(c10::BFloat16* p, vf x) {
#ifdef __AVX512BF16__
  // one instruction; it also rounds to nearest even, and flushes results below 2^-126 to zero
  const __m256bh packed = _mm512_cvtneps_pbh(x);
  std::memcpy(p, &packed, sizeof packed);
#else
  const vi u = reinterpret_cast<const vi&>(x);
  const vi rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16;  // arithmetic shift: the low 16 bits are kept below
  const vi bits = x != x ? vi{} + 0x7FC0 : rounded;
  const vh h = __builtin_convertvector(bits & 0xFFFF, vh);
  std::memcpy(p, &h, sizeof h);
#endif
}

// An activation an op takes: on the CPU, float32 or bfloat16, contiguous; else a one-line error naming
// the op, the argument and the fix
inline void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first)");
}

constexpr int64_t kRowBlock = 64;  // rows per block of the column sums

// Rows [0, M) in blocks of kRowBlock, over the threads: `row(r, acc)` handles row r, adding what it sums
// into the block's C fp32 sums `acc` (nullptr when `sums` is); then `sums` (C,) gets the blocks' sums
// added in block order, so the result does not depend on the number of threads.
template <typename Row>
void by_row_blocks(int64_t M, int64_t C, float* sums, Row row) {
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  std::unique_ptr<float[]> partial(sums == nullptr ? nullptr : new float[blocks * C]);  // filled per block
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* acc = sums == nullptr ? nullptr : partial.get() + b * C;
      if (acc != nullptr) std::fill(acc, acc + C, 0.0f);
      for (int64_t r = b * kRowBlock; r < std::min(M, (b + 1) * kRowBlock); ++r) row(r, acc);
    }
  });
  if (sums == nullptr) return;
  at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float sum = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) sum += partial[b * C + c];
      sums[c] = sum;
    }
  });
}

}  // namespace vitkit_cpu
