// W8A8 on the CPU: a GEMV for few rows of x (decode; w8a8_gemv, one loop for AVX512-VNNI and one for AVX2: their
// integer dot products differ) and an exact int8 GEMM for many rows on CPUs whose torch has no fast one
// (w8a8_int_gemm, AVX2 and later). Numerics of hfquant.kernels.w8a8: bit-identical to its reference for finite x.
#include "common.h"

#ifdef HFQUANT_W8A8_GEMV
// The W8A8 GEMV's operands: x [..., K] float32, the int8 weight [N, K], float32 scales and int32 row sums [N].
struct W8Dims {
  int64_t K, M, N;
};

static W8Dims check_w8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                       const at::Tensor& w_rowsum) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() >= 1 && x.is_contiguous(), "x: contiguous float32 [..., K]");
  TORCH_CHECK(w.dtype() == at::kChar && w.dim() == 2 && w.is_contiguous(), "w: contiguous int8 [N, K]");
  TORCH_CHECK(w_scale.dtype() == at::kFloat && w_scale.is_contiguous(), "w_scale: contiguous float32 [N]");
  TORCH_CHECK(w_rowsum.dtype() == at::kInt && w_rowsum.is_contiguous(), "w_rowsum: contiguous int32 [N]");
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0, N = w.size(0);
  TORCH_CHECK(w.size(1) == K && w_scale.numel() == N && w_rowsum.numel() == N, "shape mismatch");
  return {K, M, N};
}
#endif

#ifdef HFQUANT_VNNI
// W8A8 for few rows (decode), with the numerics of hfquant.kernels.w8a8 (bit-identical for finite x): per
// row of x, scale = max(amax|x| / 127, 1e-8) (or the static per-tensor scale), q = clamp(round_half_even(x /
// scale), -127, 127); acc = sum q * w in int32 (exact); y = (float(acc) * scale) * w_scale + bias. VPDPBUSD
// multiplies unsigned by signed bytes, so x goes in as q + 128 and 128 * (sum of the row's weights) is taken
// off the int32 sum. w_rowsum is that per-row sum, computed once per module.
at::Tensor w8a8_gemv(at::Tensor x, at::Tensor w, at::Tensor w_scale, at::Tensor w_rowsum,
                     c10::optional<at::Tensor> bias, double static_scale) {
  const W8Dims d = check_w8(x, w, w_scale, w_rowsum);
  const int64_t K = d.K, M = d.M, N = d.N;
  const float* bp = bias_ptr(bias, N);
  auto y = output_for(x, N);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* wsp = w_scale.data_ptr<float>();
  const int32_t* rsp = w_rowsum.data_ptr<int32_t>();
  const int64_t chunks = (K + 63) / 64;
  static thread_local std::vector<uint8_t> tls_q;
  static thread_local std::vector<float> tls_scale;
  std::vector<uint8_t>& q = tls_q;
  std::vector<float>& sx = tls_scale;
  q.assign(M * chunks * 64, 128);
  sx.assign(M, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xp + m * K;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = static_cast<__mmask16>((1u << std::min<int64_t>(16, K - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(mk, xr + k);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    float scale = static_scale > 0 ? static_cast<float>(static_scale)
                                   : std::max(_mm512_reduce_max_ps(amax) / 127.f, 1e-8f);
    // A NaN in x makes the row's outputs NaN (VMAXPS would drop it, and no int8 code can hold it); an
    // infinity gives an infinite scale, so the outputs are not finite either.
    if (nan != 0) scale = std::numeric_limits<float>::quiet_NaN();
    sx[m] = scale;
    const __m512 sv = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    uint8_t* qr = q.data() + m * chunks * 64;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = static_cast<__mmask16>((1u << std::min<int64_t>(16, K - k)) - 1);
      const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(mk, xr + k), sv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi)),
                                          _mm512_set1_epi32(128));
      _mm_mask_storeu_epi8(qr + k, mk, _mm512_cvtepi32_epi8(qi));
    }
  }
  constexpr int R = 4;
  const int64_t blocks = (N + R - 1) / R;
  at::parallel_for(0, blocks, 4, [&](int64_t blk0, int64_t blk1) {
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t n0 = blk * R, count = std::min<int64_t>(R, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const uint8_t* qr = q.data() + m * chunks * 64;
        __m512i acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t k = c * 64;
          const __m512i xv = _mm512_loadu_si512(qr + k);
          const __mmask64 mk = k + 64 <= K ? ~0ULL : ((1ULL << (K - k)) - 1);
          for (int r = 0; r < count; ++r) {
            const int8_t* row = wp + (n0 + r) * K + k;
            if (m == 0 && blk + 2 < blk1) _mm_prefetch(reinterpret_cast<const char*>(row + 2 * R * K), _MM_HINT_T0);
            acc[r] = _mm512_dpbusd_epi32(acc[r], xv, _mm512_maskz_loadu_epi8(mk, row));
          }
        }
        for (int r = 0; r < count; ++r) {
          const int64_t n = n0 + r;
          const int32_t dot = _mm512_reduce_add_epi32(acc[r]) - 128 * rsp[n];
          float out = static_cast<float>(dot) * sx[m];
          out = out * wsp[n];
          yp[m * N + n] = bp != nullptr ? out + bp[n] : out;
        }
      }
    }
  });
  return y;
}
#endif

#ifdef HFQUANT_AVX2
// W8A8 for few rows on AVX2, with the same numerics as the VNNI GEMV above (bit-identical to
// hfquant.kernels.w8a8 for finite x): x quantized per row to signed int8 codes, then 16 codes at a time
// sign-extended to 16 bits and multiplied with the weight's 16 bytes by VPMADDWD (pairwise products summed
// into int32: exact, no saturation), one int32 sum per row; the same float32 epilogue.
at::Tensor w8a8_gemv(at::Tensor x, at::Tensor w, at::Tensor w_scale, at::Tensor w_rowsum,
                     c10::optional<at::Tensor> bias, double static_scale) {
  const W8Dims d = check_w8(x, w, w_scale, w_rowsum);
  const int64_t K = d.K, M = d.M, N = d.N;
  const float* bp = bias_ptr(bias, N);
  auto y = output_for(x, N);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* wsp = w_scale.data_ptr<float>();
  const int64_t K16 = K / 16 * 16;
  static thread_local std::vector<int8_t> tls_q;
  static thread_local std::vector<float> tls_scale;
  std::vector<int8_t>& q = tls_q;
  std::vector<float>& sx = tls_scale;
  q.assign(M * K, 0);
  sx.assign(M, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xp + m * K;
    float amax = 0.f;
    bool nan = false;
    for (int64_t k = 0; k < K; ++k) {
      nan |= std::isnan(xr[k]);
      amax = std::max(amax, std::fabs(xr[k]));
    }
    float scale = static_scale > 0 ? static_cast<float>(static_scale) : std::max(amax / 127.f, 1e-8f);
    if (nan) scale = std::numeric_limits<float>::quiet_NaN();
    sx[m] = scale;
    int8_t* qr = q.data() + m * K;
    const __m256 sv = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + k), sv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      alignas(32) int32_t tmp[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi)));
      for (int i = 0; i < 8; ++i) qr[k + i] = static_cast<int8_t>(tmp[i]);
    }
    for (; k < K; ++k) {
      const float r = std::nearbyint(xr[k] / scale);  // round half to even (the default rounding mode)
      qr[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, r)));
    }
  }
  constexpr int R = 4;
  const int64_t blocks = (N + R - 1) / R;
  at::parallel_for(0, blocks, 4, [&](int64_t blk0, int64_t blk1) {
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t n0 = blk * R, count = std::min<int64_t>(R, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* qr = q.data() + m * K;
        __m256i acc[R];
        int32_t tail[R];
        for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_si256(); tail[r] = 0; }
        for (int64_t k = 0; k < K16; k += 16) {
          const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k)));
          for (int r = 0; r < count; ++r) {
            const int8_t* row = wp + (n0 + r) * K + k;
            if (m == 0 && (k & 63) == 0 && blk + 2 < blk1) {
              _mm_prefetch(reinterpret_cast<const char*>(row + 2 * R * K), _MM_HINT_T0);
            }
            const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(xv, wv));
          }
        }
        for (int r = 0; r < count; ++r) {
          const int8_t* row = wp + (n0 + r) * K;
          for (int64_t k = K16; k < K; ++k) tail[r] += static_cast<int32_t>(qr[k]) * row[k];
        }
        for (int r = 0; r < count; ++r) {
          const int64_t n = n0 + r;
          const int32_t dot = hsum256_epi32(acc[r]) + tail[r];
          float out = static_cast<float>(dot) * sx[m];
          out = out * wsp[n];
          yp[m * N + n] = bp != nullptr ? out + bp[n] : out;
        }
      }
    }
  });
  return y;
}
#endif

#ifdef HFQUANT_INT_GEMM
// int8 x int8 -> int32 GEMM for W8A8 with many rows on CPUs without AVX512-VNNI, where torch's _int_mm is a
// plain loop: c[m, n] = sum_k a[m, k] * w[n, k], the same contract as torch._int_mm(a, w.t()), exact.
// VPMADDWD multiplies 16-bit lanes pairwise and adds each pair into an int32 lane: no saturation for int8
// inputs (|a w| + |a w| <= 2 * 128^2), unlike VPMADDUBSW. So a is widened to int16 once per call, and each
// block of W (GEMM_NB rows x GEMM_KC columns) is widened once into a per-thread buffer, in the order the
// micro-kernel reads it; the micro-kernel keeps GEMM_MR x GEMM_NR int32 vector accumulators (one per output,
// 16 columns a step; their lanes are summed once per block of columns) and reads each vector of a and of the
// block once per step for several outputs. Threads take blocks of W's rows. Columns past the last multiple
// of 16 go through a scalar loop.
constexpr int64_t GEMM_KC = 1024, GEMM_NB = 64;

template <int MR, int NR>
static inline void int_gemm_micro(const int16_t* a, int64_t lda, const int16_t* b, int64_t kv, int32_t* c,
                                  int64_t ldc) {
  __m256i acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kv; k += 16, b += 16 * NR) {
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * lda + k));
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) {
        const __m256i bv = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + 16 * j));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(av, bv));
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) c[i * ldc + j] += hsum256_epi32(acc[i][j]);
}

// The micro-kernel for the tile's real size (the last rows of a or of a block may be fewer).
template <int MR>
static inline void int_gemm_tile_n(int nr, const int16_t* a, int64_t lda, const int16_t* b, int64_t kv, int32_t* c,
                                   int64_t ldc) {
  switch (nr) {
    case 4: int_gemm_micro<MR, 4>(a, lda, b, kv, c, ldc); break;
    case 3: int_gemm_micro<MR, 3>(a, lda, b, kv, c, ldc); break;
    case 2: int_gemm_micro<MR, 2>(a, lda, b, kv, c, ldc); break;
    default: int_gemm_micro<MR, 1>(a, lda, b, kv, c, ldc); break;
  }
}

static inline void int_gemm_tile(int mr, int nr, const int16_t* a, int64_t lda, const int16_t* b, int64_t kv,
                                 int32_t* c, int64_t ldc) {
  static_assert(GEMM_MR == 3 && GEMM_NR == 4, "the switches below cover GEMM_MR x GEMM_NR");
  switch (mr) {
    case 3: int_gemm_tile_n<3>(nr, a, lda, b, kv, c, ldc); break;
    case 2: int_gemm_tile_n<2>(nr, a, lda, b, kv, c, ldc); break;
    default: int_gemm_tile_n<1>(nr, a, lda, b, kv, c, ldc); break;
  }
}

at::Tensor w8a8_int_gemm(at::Tensor a, at::Tensor w) {
  TORCH_CHECK(a.dtype() == at::kChar && a.dim() == 2 && a.is_contiguous(), "a: contiguous int8 [M, K]");
  TORCH_CHECK(w.dtype() == at::kChar && w.dim() == 2 && w.is_contiguous(), "w: contiguous int8 [N, K]");
  TORCH_CHECK(w.size(1) == a.size(1), "a and w must have the same number of columns");
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  auto c = at::zeros({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0 || K == 0) return c;
  const auto a16 = a.to(at::kShort);
  const int16_t* ap = a16.data_ptr<int16_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  int32_t* cp = c.data_ptr<int32_t>();
  const int64_t blocks = (N + GEMM_NB - 1) / GEMM_NB;
  at::parallel_for(0, blocks, 1, [&](int64_t blk0, int64_t blk1) {
    // The widened block: per group of GEMM_NR rows, [k / 16][row][16] int16 (32-byte aligned vectors).
    std::vector<__m256i> buf_vectors(GEMM_NB * GEMM_KC / 16);
    int16_t* buf = reinterpret_cast<int16_t*>(buf_vectors.data());
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t n0 = blk * GEMM_NB, n1 = std::min(N, n0 + GEMM_NB);
      for (int64_t k0 = 0; k0 < K; k0 += GEMM_KC) {
        const int64_t k1 = std::min(K, k0 + GEMM_KC), kv = (k1 - k0) / 16 * 16;
        for (int64_t n = n0; n < n1; n += GEMM_NR) {
          const int nr = static_cast<int>(std::min<int64_t>(GEMM_NR, n1 - n));
          int16_t* dst = buf + (n - n0) * kv;
          for (int64_t k = 0; k < kv; k += 16) {
            for (int j = 0; j < nr; ++j, dst += 16) {
              const auto* src = reinterpret_cast<const __m128i*>(wp + (n + j) * K + k0 + k);
              _mm256_store_si256(reinterpret_cast<__m256i*>(dst), _mm256_cvtepi8_epi16(_mm_loadu_si128(src)));
            }
          }
        }
        for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {
          const int mr = static_cast<int>(std::min<int64_t>(GEMM_MR, M - m0));
          for (int64_t n = n0; n < n1; n += GEMM_NR) {
            const int nr = static_cast<int>(std::min<int64_t>(GEMM_NR, n1 - n));
            int_gemm_tile(mr, nr, ap + m0 * K + k0, K, buf + (n - n0) * kv, kv, cp + m0 * N + n, N);
            for (int i = 0; i < mr && kv < k1 - k0; ++i) {
              for (int j = 0; j < nr; ++j) {
                int32_t s = 0;
                for (int64_t k = k0 + kv; k < k1; ++k) s += static_cast<int32_t>(ap[(m0 + i) * K + k]) * wp[(n + j) * K + k];
                cp[(m0 + i) * N + n + j] += s;
              }
            }
          }
        }
      }
    }
  });
  return c;
}
#endif
