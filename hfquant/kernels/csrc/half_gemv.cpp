// A float32 Linear whose weight is stored in 16 bits (bfloat16 or float16 bit patterns, int16 [N, K]) because its
// values are exactly 16-bit ones (a float32 model loaded from a bf16/fp16 checkpoint): y = x @ W^T + b in float32,
// each weight widened to float32 in registers (bf16: a 16-bit shift; fp16: F16C's VCVTPH2PS), FMA accumulation
// (half_gemv; AVX-512, or AVX2 + FMA + F16C: one body for both widths, FVec).
// For few rows of x (decode): the weight is read once per call, half the bytes of a float32 GEMV. Blocks of R
// rows of W, each multiplied with every row of x while it is in cache; 2 vectors of K per step (2R independent
// FMA chains).
#include "common.h"

#ifdef HFQUANT_HALF_GEMV
template <bool BF16>
static inline float half_to_float(uint16_t h) {
  if constexpr (BF16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

template <bool BF16>
static void half_gemv_impl(const float* xp, const uint16_t* wp, const float* bp, float* yp, int64_t M, int64_t N,
                           int64_t K) {
  using V = FVec;
  constexpr int R = 4;
  constexpr int64_t step = 2 * V::kLanes;
  const int64_t Kv = K / step * step;
  const int64_t blocks = (N + R - 1) / R;
  at::parallel_for(0, blocks, 16, [&](int64_t blk0, int64_t blk1) {
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t n0 = blk * R, count = std::min<int64_t>(R, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float out[R];
        if (count == R) {
          typename V::F a0[R], a1[R];
          for (int r = 0; r < R; ++r) a0[r] = a1[r] = V::zero();
          for (int64_t k = 0; k < Kv; k += step) {
            const typename V::F x0 = V::load(xr + k), x1 = V::load(xr + k + V::kLanes);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
              const uint16_t* row = wp + (n0 + r) * K + k;
              a0[r] = V::fma(V::loadw<BF16>(row), x0, a0[r]);
              a1[r] = V::fma(V::loadw<BF16>(row + V::kLanes), x1, a1[r]);
            }
          }
          for (int r = 0; r < R; ++r) out[r] = V::sum(a0[r]) + V::sum(a1[r]);
        } else {
          for (int64_t r = 0; r < count; ++r) {
            typename V::F a0 = V::zero(), a1 = V::zero();
            const uint16_t* row = wp + (n0 + r) * K;
            for (int64_t k = 0; k < Kv; k += step) {
              a0 = V::fma(V::loadw<BF16>(row + k), V::load(xr + k), a0);
              a1 = V::fma(V::loadw<BF16>(row + k + V::kLanes), V::load(xr + k + V::kLanes), a1);
            }
            out[r] = V::sum(a0) + V::sum(a1);
          }
        }
        for (int64_t r = 0; r < count; ++r) {
          const uint16_t* row = wp + (n0 + r) * K;
          float tail = 0.f;
          for (int64_t k = Kv; k < K; ++k) tail += half_to_float<BF16>(row[k]) * xr[k];
          const float v = out[r] + tail;
          yp[m * N + n0 + r] = bp != nullptr ? v + bp[n0 + r] : v;
        }
      }
    }
  });
}

// x [..., K] float32, w [N, K] int16 holding bfloat16 (bf16 true) or float16 bit patterns, bias float32 [N] or none.
at::Tensor half_gemv(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, bool bf16) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() >= 1 && x.is_contiguous(), "x: contiguous float32 [..., K]");
  TORCH_CHECK(w.dtype() == at::kShort && w.dim() == 2 && w.is_contiguous(), "w: contiguous int16 [N, K]");
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0, N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "w: [N, K] with x's K");
  const float* bp = bias_ptr(bias, N);
  auto y = output_for(x, N);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<int16_t>());
  if (bf16) {
    half_gemv_impl<true>(x.data_ptr<float>(), wp, bp, y.data_ptr<float>(), M, N, K);
  } else {
    half_gemv_impl<false>(x.data_ptr<float>(), wp, bp, y.data_ptr<float>(), M, N, K);
  }
  return y;
}
#endif
