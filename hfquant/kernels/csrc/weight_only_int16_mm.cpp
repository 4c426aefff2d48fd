// Weight-only 4-bit codes (and 8-bit codes, bits == 8) for many rows of x with 16-bit integer activations, the
// "int16" path (weight_only_int16_mm; AVX2 and later, on the int8 GEMM's micro-kernel shape, GEMM_MR x GEMM_NR):
// x is rounded per row and quantization group to int16 codes, sx = max|x_g| / 32767 (15 bits relative to the
// group's largest value; bf16 keeps 8 bits), and sum_k q_k x_k of each group is an exact int32 VPMADDWD sum of
// the codes (0..15, widened from their nibbles once per block of W) with those int16 codes. Per group:
//   y += s_g * sx_g * (sum_k q_k xq_k)  -  s_g * z_g * sx_g * (sum_k xq_k),
// the first term in the micro-kernel (float32 vector accumulators, one FMA per group and output), the second,
// for all groups at once, as one small float32 GEMM ([M, G] x [G, N]) after it. The activation codes are
// stored per 32 columns as the 16 even columns, then the 16 odd ones: the order of the low and high nibbles
// of 16 packed bytes, so a block of W widens with one AND and one shift per 32 codes. 8-bit codes (one a byte)
// keep the columns in order.
#include "common.h"

#ifdef HFQUANT_INT_GEMM
constexpr int64_t INT16_NB = 64, INT16_KC = 1024;

template <int MR, int NR>
static inline void int16_micro(const int16_t* a, int64_t lda, const int16_t* b, int64_t chunks_in_group,
                               int64_t groups, int64_t group_chunks, const float* sx, int64_t ldsx,
                               const float* s, int64_t lds, float* c, int64_t ldc) {
  __m256 facc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) facc[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[MR][NR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
    const int64_t nch = std::min(group_chunks, chunks_in_group - g * group_chunks);
    for (int64_t ch = 0; ch < nch; ++ch, b += 32 * NR) {
      const int64_t k = (g * group_chunks + ch) * 32;
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const __m256i a_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * lda + k));
        const __m256i a_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * lda + k + 16));
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) {
          const __m256i lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + 32 * j));
          const __m256i hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + 32 * j + 16));
          acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_add_epi32(_mm256_madd_epi16(a_even, lo),
                                                                   _mm256_madd_epi16(a_odd, hi)));
        }
      }
    }
    __m256 sv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) sv[j] = _mm256_set1_ps(s[j * lds + g]);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256 xs = _mm256_set1_ps(sx[i * ldsx + g]);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) {
        facc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][j]), _mm256_mul_ps(xs, sv[j]), facc[i][j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) c[i * ldc + j] += hsum256(facc[i][j]);
}

template <int MR>
static inline void int16_tile_n(int nr, const int16_t* a, int64_t lda, const int16_t* b, int64_t chunks, int64_t groups,
                                int64_t gch, const float* sx, int64_t ldsx, const float* s, int64_t lds, float* c,
                                int64_t ldc) {
  switch (nr) {
    case 4: int16_micro<MR, 4>(a, lda, b, chunks, groups, gch, sx, ldsx, s, lds, c, ldc); break;
    case 3: int16_micro<MR, 3>(a, lda, b, chunks, groups, gch, sx, ldsx, s, lds, c, ldc); break;
    case 2: int16_micro<MR, 2>(a, lda, b, chunks, groups, gch, sx, ldsx, s, lds, c, ldc); break;
    default: int16_micro<MR, 1>(a, lda, b, chunks, groups, gch, sx, ldsx, s, lds, c, ldc); break;
  }
}

at::Tensor weight_only_int16_mm(at::Tensor x, at::Tensor w, at::Tensor scales, at::Tensor zeros,
                                c10::optional<at::Tensor> bias, int64_t group, int64_t bits) {
  const WeightOnlyDims d = check_weight_only(x, w, scales, zeros, group);
  const int64_t K = d.K, M = d.M, N = d.N, KB = d.KB, G = d.G;
  TORCH_CHECK(bits == 4 || (bits == 8 && KB >= K), "bits must be 4 (two codes a byte) or 8 (w [N, >= K])");
  // 8-bit codes: one per byte in column order; a group's int32 lanes stay exact up to 2048 columns.
  TORCH_CHECK(bits == 4 || group <= 2048, "8-bit codes: groups of at most 2048 columns");
  const int64_t K32 = (K + 31) / 32 * 32, gch = group / 32;
  auto y = at::zeros({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(shape_for(x, N));
  // x -> int16 codes per row and group, in the nibbles' column order; sx and the codes' sums per row and group.
  auto a16 = at::zeros({M, K32}, x.options().dtype(at::kShort));
  auto sx_t = at::empty({M, G}, x.options());
  auto xsum_t = at::empty({M, G}, x.options());
  const float* xp = x.data_ptr<float>();
  int16_t* ap = a16.data_ptr<int16_t>();
  float* sxp = sx_t.data_ptr<float>();
  float* xsp = xsum_t.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * group, k1 = std::min(K, k0 + group);
        float amax = 0.f;
        bool finite = true;
        for (int64_t k = k0; k < k1; ++k) {
          const float v = xp[m * K + k];
          finite &= std::isfinite(v);
          amax = std::max(amax, std::fabs(v));
        }
        // A NaN or inf makes the group's scale NaN, so every output it reaches is NaN (never silently finite).
        const float scale = !finite ? std::numeric_limits<float>::quiet_NaN() : amax / 32767.f;
        sxp[m * G + g] = scale;
        int64_t total = 0;
        for (int64_t k = k0; k < k1 && scale > 0.f; ++k) {
          const float r = std::nearbyint(xp[m * K + k] / scale);
          const int16_t q = static_cast<int16_t>(std::min(32767.f, std::max(-32767.f, r)));
          const int64_t chunk = k / 32, col = k % 32;
          ap[m * K32 + (bits == 8 ? k : chunk * 32 + (col % 2) * 16 + col / 2)] = q;
          total += q;
        }
        xsp[m * G + g] = static_cast<float>(total);
      }
    }
  });
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups_per_block = std::max<int64_t>(1, INT16_KC / group);
  const int64_t blocks = (N + INT16_NB - 1) / INT16_NB;
  at::parallel_for(0, blocks, 1, [&](int64_t blk0, int64_t blk1) {
    // The widened block: per group of GEMM_NR rows and chunk of 32 columns, per row the 16 even then the 16 odd
    // columns' codes as int16.
    std::vector<__m256i> buf_vectors(INT16_NB * groups_per_block * group / 16);
    int16_t* buf = reinterpret_cast<int16_t*>(buf_vectors.data());
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t n0 = blk * INT16_NB, n1 = std::min(N, n0 + INT16_NB);
      for (int64_t g0 = 0; g0 < G; g0 += groups_per_block) {
        const int64_t g1 = std::min(G, g0 + groups_per_block);
        const int64_t c0 = g0 * gch, c1 = std::min((K32 / 32), g1 * gch), chunks = c1 - c0;
        for (int64_t n = n0; n < n1; n += GEMM_NR) {
          const int nr = static_cast<int>(std::min<int64_t>(GEMM_NR, n1 - n));
          int16_t* dst = buf + (n - n0) * chunks * 32;
          for (int64_t ch = c0; ch < c1; ++ch) {
            for (int j = 0; j < nr; ++j, dst += 32) {
              const uint8_t* row = wp + (n + j) * KB;
              const int64_t chunk_bytes = bits == 8 ? 32 : 16, b0 = ch * chunk_bytes;
              alignas(32) uint8_t tmp[32] = {0};
              const uint8_t* src = row + b0;
              if (b0 + chunk_bytes > KB) {  // the row's last bytes: copy what exists, zeros after (x's codes are 0 too)
                std::copy(row + b0, row + KB, tmp);
                src = tmp;
              }
              const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
              if (bits == 8) {  // columns in order: the chunk's first 16 codes, then the next 16
                _mm256_store_si256(reinterpret_cast<__m256i*>(dst), v);
                _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 16),
                                   _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
              } else {  // low nibbles (even columns), then high nibbles (odd columns)
                _mm256_store_si256(reinterpret_cast<__m256i*>(dst), _mm256_and_si256(v, _mm256_set1_epi16(15)));
                _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 16), _mm256_srli_epi16(v, 4));
              }
            }
          }
        }
        for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {
          const int mr = static_cast<int>(std::min<int64_t>(GEMM_MR, M - m0));
          for (int64_t n = n0; n < n1; n += GEMM_NR) {
            const int nr = static_cast<int>(std::min<int64_t>(GEMM_NR, n1 - n));
            const int16_t* a = ap + m0 * K32 + c0 * 32;
            const int16_t* b = buf + (n - n0) * chunks * 32;
            const float* sxb = sxp + m0 * G + g0;
            const float* sb = sp + n * G + g0;
            float* c = yp + m0 * N + n;
            switch (mr) {
              case 3: int16_tile_n<3>(nr, a, K32, b, chunks, g1 - g0, gch, sxb, G, sb, G, c, N); break;
              case 2: int16_tile_n<2>(nr, a, K32, b, chunks, g1 - g0, gch, sxb, G, sb, G, c, N); break;
              default: int16_tile_n<1>(nr, a, K32, b, chunks, g1 - g0, gch, sxb, G, sb, G, c, N); break;
            }
          }
        }
      }
    }
  });
  // The zero points: y -= (sx * sum xq) [M, G] @ (s * z)^T [G, N].
  y.sub_(at::mm(sx_t * xsum_t, (scales * zeros).t()));
  if (bias_ptr(bias, N) != nullptr) y.add_(*bias);
  return y.view(shape_for(x, N));
}
#endif
