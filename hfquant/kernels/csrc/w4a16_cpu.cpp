// hfquant CPU kernels: W4A16 for few rows (decode), y = x @ dequant(W)^T + b, float32 in and out (w4a16_gemv);
// W4A16 for many rows (prefill): dequantized tiles and torch's GEMM (w4a16_dequant_mm); W8A8 for few rows with
// AVX512-VNNI or AVX2 (w8a8_gemv, further down); an exact int8 GEMM for W8A8 with many rows on CPUs whose
// torch has no fast int8 GEMM (w8a8_int_gemm, AVX2 and later); a float32 Linear whose weight is stored in 16 bits,
// exactly, for few rows (half_gemv, AVX2 + F16C and later).
//
// Weights are read in hfquant's own packed layout (hfquant/core/packing.py) viewed as bytes: byte b of a row
// holds the 4-bit codes of columns 2b (low nibble) and 2b+1 (high nibble). Per quantization group g of a
// row, with scale s and zero point z:  sum_k s * (q_k - z) * x_k  =  s * (sum_k q_k * x_k  -  z * sum_k x_k),
// so the inner loop multiplies unpacked codes with x, and the scale and zero are applied once per group.
// Rows of W are split across torch's intra-op threads. Inner loops, chosen when compiling (-march=native):
//   * AVX512-VNNI (Cascade Lake and later Xeons, Zen 4): integer dot products over a three-part int8 split
//     of x (rows_dot_vnni); float32-level accuracy (about 2e-6 relative to the float32 reference);
//   * AVX-512F without VNNI (Skylake-X): float32 FMAs over codes converted to float (rows_dot);
//   * AVX2 + FMA without AVX-512 (AMD Zen 2/3, Intel Haswell..Comet Lake; cpu_ext.py builds it with
//     -march=haswell on such CPUs, or to test it on others): the same FMA loop on 256-bit vectors, and a
//     W8A8 GEMV whose int8 dot products are exact 16-bit multiply-adds (VPMADDWD);
//   * otherwise a scalar loop (cpu_ext.py does not use it: torch's int4 kernel is faster there).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// The integer dot-product loops (W4A16 decode, W8A8 decode) need AVX512-VNNI and AVX512-BW.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HFQUANT_VNNI 1
#endif
// The 256-bit loops: AVX2 and FMA, no AVX-512.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define HFQUANT_AVX2 1
#endif
// The 16-bit integer GEMMs (W8A8, and W4A16 with int16 activations, for many rows) are built wherever AVX2 and
// FMA are.
#if defined(__AVX2__) && defined(__FMA__)
#define HFQUANT_INT_GEMM 1
static inline float hsum256(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
static inline int32_t hsum256_epi32(__m256i v) {
  __m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1));
  return _mm_cvtsi128_si32(r);
}
#endif

// One output: sum over groups of s_g * (sum_b lo(b) e[b] + hi(b) o[b]) - sum_g s_g z_g xs_g.
// AVX-512: R rows at once (independent FMA chains; x loaded once for all R), the group scale applied to
// the vector accumulator with one FMA, one horizontal sum per row at the end.
template <int R>
static inline void rows_dot(const uint8_t* const* rows, const float* e, const float* o, const float* const* s,
                            const float* const* z, const float* xs, int64_t G, int64_t half, int64_t KB,
                            float* out, int64_t ahead = 0) {
#ifdef __AVX512F__
  const __m512i mask = _mm512_set1_epi32(15);
  __m512 total[R];
  float corr[R];
  for (int r = 0; r < R; ++r) { total[r] = _mm512_setzero_ps(); corr[r] = 0.f; }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t b0 = g * half, b1 = std::min((g + 1) * half, KB);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; b += 16) {
      const __m512 ev = _mm512_loadu_ps(e + b), ov = _mm512_loadu_ps(o + b);
      if (ahead != 0 && (b & 63) == 0) {
        // Software prefetch of the same cache line of the rows one block ahead: a decode GEMV streams its
        // weights from DRAM once, and the hardware prefetcher alone left this loop waiting on memory.
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + b + ahead), _MM_HINT_T0);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + b)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(w, mask)), ev, acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4)), ov, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      total[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r][g]), acc[r], total[r]);
      corr[r] += s[r][g] * z[r][g] * xs[g];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(total[r]) - corr[r];
#elif defined(HFQUANT_AVX2)
  // As above on 8-float vectors: 8 packed bytes (16 columns) per row per step.
  const __m256i mask = _mm256_set1_epi32(15);
  __m256 total[R];
  float corr[R];
  for (int r = 0; r < R; ++r) { total[r] = _mm256_setzero_ps(); corr[r] = 0.f; }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t b0 = g * half, b1 = std::min((g + 1) * half, KB);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = b0; b < b1; b += 8) {
      const __m256 ev = _mm256_loadu_ps(e + b), ov = _mm256_loadu_ps(o + b);
      if (ahead != 0 && (b & 63) == 0) {
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + b + ahead), _MM_HINT_T0);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[r] + b)));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w, mask)), ev, acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4)), ov, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      total[r] = _mm256_fmadd_ps(_mm256_set1_ps(s[r][g]), acc[r], total[r]);
      corr[r] += s[r][g] * z[r][g] * xs[g];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum256(total[r]) - corr[r];
#else
  for (int r = 0; r < R; ++r) {
    float res = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t b0 = g * half, b1 = std::min((g + 1) * half, KB);
      float acc = 0.f;
      for (int64_t b = b0; b < b1; ++b) {
        acc += static_cast<float>(rows[r][b] & 15) * e[b] + static_cast<float>(rows[r][b] >> 4) * o[b];
      }
      res += s[r][g] * (acc - z[r][g] * xs[g]);
    }
    out[r] = res;
  }
#endif
}


#ifdef HFQUANT_VNNI
// AVX512-VNNI path: integer dot products with float32-level accuracy.
//
// x is split per chunk of 128 columns (64 packed bytes) into three int8 parts with one float scale sx:
// x ~= sx * (p0 + p1 / 128 + p2 / 128^2), each part rounding what the previous one left (|p0| <= 127,
// |p1|, |p2| <= 64), so x keeps about 21 bits relative to the chunk's largest |x| (error <= sx / 2^15).
// The even and odd columns of each part are stored apart, matching the low and high nibbles of the packed
// bytes, and VPDPBUSD multiplies 64 unsigned codes with 64 signed parts into 16 int32 lanes: a chunk of a
// row takes 6 of them, with no per-weight conversion to float. The three int32 sums are exact and are
// combined as a0 * 2^14 + (a1 * 2^7 + a2) (the bracket is exact in float32: < 2^24). Zero points use the
// float32 group sums of x:  s * (sum q x  -  z * sum x).
// Lane i of a chunk's int32 sums covers its columns 8i .. 8i+7, so a chunk that spans several quantization
// groups (groups of 32 or 64 columns, or a partial last group) gets its scales per lane with one permute;
// a chunk inside one group (the usual g128 case) broadcasts the scale.
constexpr int64_t kChunkBytes = 64, kChunkCols = 128, kParts = 3;

struct QuantRow {
  std::vector<int8_t> planes;  // [chunks][kParts][even, odd][64]
  std::vector<float> scale;    // [chunks]: sx / 2^14
  std::vector<float> sums;     // [G]: float32 sums of x per quantization group
};

static void quantize_row(const float* x, int64_t K, int64_t chunks, int64_t group, int64_t G, QuantRow& q) {
  q.planes.assign(chunks * kParts * 128, 0);
  q.scale.assign(chunks, 0.f);
  q.sums.assign(G, 0.f);
  alignas(64) static const int32_t even_idx[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  alignas(64) static const int32_t odd_idx[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i ie = _mm512_load_si512(even_idx), io = _mm512_load_si512(odd_idx);
  for (int64_t c = 0; c < chunks; ++c) {
    // 128 columns as 4 pairs of (16 even, 16 odd) columns; zero beyond K.
    __m512 v[8];
    __m512 amax = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      __m512 in[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t k0 = c * kChunkCols + 32 * j + 16 * h;
        const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, K - k0));
        in[h] = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1), x + std::min(k0, K));
      }
      const int64_t k0 = c * kChunkCols + 32 * j;
      if (k0 < K) q.sums[k0 / group] += _mm512_reduce_add_ps(_mm512_add_ps(in[0], in[1]));
      v[2 * j] = _mm512_permutex2var_ps(in[0], ie, in[1]);
      v[2 * j + 1] = _mm512_permutex2var_ps(in[0], io, in[1]);
      amax = _mm512_max_ps(amax, _mm512_max_ps(_mm512_abs_ps(v[2 * j]), _mm512_abs_ps(v[2 * j + 1])));
    }
    const float mx = _mm512_reduce_max_ps(amax);
    if (!(mx > 0.f) || !std::isfinite(mx)) {
      // All zero: parts stay zero. Inf/NaN: no integer part can hold them; fill the scale with NaN so the
      // outputs that read this chunk are NaN, as a float32 product would make them.
      q.scale[c] = mx > 0.f || std::isnan(mx) ? std::numeric_limits<float>::quiet_NaN() : 0.f;
      continue;
    }
    const float sx = mx / 127.f;
    q.scale[c] = sx / 16384.f;
    int8_t* out = q.planes.data() + c * kParts * 128;
    float step = sx;
    for (int64_t p = 0; p < kParts; ++p, step /= 128.f) {
      const __m512 inv = _mm512_set1_ps(1.f / step), st = _mm512_set1_ps(step);
      for (int j = 0; j < 4; ++j) {
        for (int eo = 0; eo < 2; ++eo) {
          __m512& u = v[2 * j + eo];
          const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(u, inv));  // round to nearest even
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out + p * 128 + eo * 64 + 16 * j), _mm512_cvtsepi32_epi8(qi));
          u = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qi), st, u);
        }
      }
    }
  }
}

// Per chunk: the first group it touches and, per int32 lane, the group of the lane minus that first group.
struct ChunkGroups {
  std::vector<int64_t> first;
  std::vector<int32_t> lane;  // [chunks, 16]
  bool uniform = true;        // every chunk lies in one group
  int64_t chunks = -1, group = -1, G = -1;  // the layout it was built for
};

// Fills cg for a layout; a no-op when cg already holds it (consecutive calls on one module, or on modules of
// one shape, as in a decode step).
static void chunk_groups(int64_t chunks, int64_t group, int64_t G, ChunkGroups& cg) {
  if (cg.chunks == chunks && cg.group == group && cg.G == G) return;
  cg.chunks = chunks;
  cg.group = group;
  cg.G = G;
  cg.uniform = true;
  cg.first.resize(chunks);
  cg.lane.resize(chunks * 16);
  for (int64_t c = 0; c < chunks; ++c) {
    cg.first[c] = std::min<int64_t>(c * kChunkCols / group, G - 1);
    for (int i = 0; i < 16; ++i) {
      const int64_t g = std::min<int64_t>((c * kChunkCols + 8 * i) / group, G - 1);
      cg.lane[c * 16 + i] = static_cast<int32_t>(g - cg.first[c]);
      if (g != cg.first[c]) cg.uniform = false;
    }
  }
}

// One chunk of one row: sum_k q_k * x_k for the columns of each int32 lane, in units of sx / 2^14, as float32.
static inline __m512 chunk_dot(__m512i w, const __m512i* e, const __m512i* o) {
  const __m512i nib = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
  const __m512i a0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, e[0]), hi, o[0]);
  const __m512i a1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, e[1]), hi, o[1]);
  const __m512i a2 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, e[2]), hi, o[2]);
  const __m512i low = _mm512_add_epi32(_mm512_slli_epi32(a1, 7), a2);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), _mm512_set1_ps(16384.f), _mm512_cvtepi32_ps(low));
}

template <int R, bool UNIFORM>
static inline void rows_dot_vnni(const uint8_t* const* rows, const QuantRow& xq, const ChunkGroups& cg,
                                 const float* const* s, const float* const* z, int64_t G, int64_t KB,
                                 int64_t chunks, float* out, int64_t ahead) {
  const __m512i zero = _mm512_setzero_si512();
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * kChunkBytes;
    const bool whole = b + kChunkBytes <= KB;
    const __mmask64 bytes = whole ? ~0ULL : ((1ULL << (KB - b)) - 1);
    const int8_t* pl = xq.planes.data() + c * kParts * 128;
    __m512i e[kParts], o[kParts];
    for (int64_t p = 0; p < kParts; ++p) {
      e[p] = _mm512_loadu_si512(pl + p * 128);
      o[p] = _mm512_loadu_si512(pl + p * 128 + 64);
    }
    const float sxc = xq.scale[c];
    const int64_t g0 = cg.first[c];
    __m512i lanes = zero;
    __mmask16 gmask = 0;
    if (!UNIFORM) {
      lanes = _mm512_loadu_si512(cg.lane.data() + c * 16);
      gmask = static_cast<__mmask16>((1u << std::min<int64_t>(16, G - g0)) - 1);
    }
    // The scales of row r for the int32 lanes of this chunk, times x's chunk scale.
    auto lane_scales = [&](int r) {
      return UNIFORM ? _mm512_set1_ps(s[r][g0] * sxc)
                     : _mm512_mul_ps(_mm512_permutexvar_ps(lanes, _mm512_maskz_loadu_ps(gmask, s[r] + g0)),
                                     _mm512_set1_ps(sxc));
    };
    if (ahead != 0) {
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + b + ahead), _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i w = whole ? _mm512_loadu_si512(rows[r] + b) : _mm512_maskz_loadu_epi8(bytes, rows[r] + b);
      total[r] = _mm512_fmadd_ps(lane_scales(r), chunk_dot(w, e, o), total[r]);
    }
  }
  // The zero points: sum_g s_g z_g xsum_g, 16 groups at a time.
  for (int r = 0; r < R; ++r) {
    __m512 corr = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, G - g)) - 1);
      const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s[r] + g), _mm512_maskz_loadu_ps(m, z[r] + g));
      corr = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(m, xq.sums.data() + g), corr);
    }
    out[r] = _mm512_reduce_add_ps(_mm512_sub_ps(total[r], corr));
  }
}
#endif

// Rows of W in blocks of R, split across torch's intra-op threads; y = dot + bias (bias may be null). For each
// block and each row m of x, dot(rows, s, z, m, out, count, ahead) writes `count` outputs: count == R for whole blocks (independent
// accumulator chains, x's vectors loaded once for all R rows), or 1 for the rows left over.
template <int R, typename Dot>
static void over_row_blocks(int64_t M, int64_t N, int64_t KB, int64_t G, const uint8_t* wp, const float* sp,
                            const float* zp, const float* bp, float* yp, Dot dot) {
  const int64_t blocks = (N + R - 1) / R;
  at::parallel_for(0, blocks, 4, [&](int64_t blk0, int64_t blk1) {
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t n0 = blk * R, count = std::min<int64_t>(R, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        float out[R];
        if (count == R) {
          const uint8_t* rows[R];
          const float* s[R];
          const float* z[R];
          for (int r = 0; r < R; ++r) {
            rows[r] = wp + (n0 + r) * KB;
            s[r] = sp + (n0 + r) * G;
            z[r] = zp + (n0 + r) * G;
          }
          // Prefetch the rows two blocks ahead while this block runs (never past the end of w). On a 2-core
          // AVX-512 Xeon with cold caches this took the float32 kernel at 4096x4096, M=1 from about 1.0 to
          // 0.72 ms; distances of 1 to 8 blocks measured the same within noise.
          constexpr int64_t kAhead = 2;
          const int64_t ahead = (m == 0 && n0 + (kAhead + 1) * R <= N) ? kAhead * R * KB : 0;
          dot(rows, s, z, m, out, R, ahead);
        } else {
          for (int64_t r = 0; r < count; ++r) {
            const uint8_t* row = wp + (n0 + r) * KB;
            const float* sr = sp + (n0 + r) * G;
            const float* zr = zp + (n0 + r) * G;
            dot(&row, &sr, &zr, m, out + r, 1, int64_t{0});
          }
        }
        for (int64_t r = 0; r < count; ++r) yp[m * N + n0 + r] = out[r] + (bp != nullptr ? bp[n0 + r] : 0.f);
      }
    }
  });
}

// Shared argument checks. The W4A16 operands: x [..., K] float32, packed codes [N, KB] uint8, float32 scales
// and zeros [N, G] with G = ceil(K / group).
struct W4Dims {
  int64_t K, M, N, KB, G;
};

static W4Dims check_w4(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                       const torch::Tensor& zeros, int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1 && x.is_contiguous(), "x: contiguous float32 [..., K]");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "w: contiguous uint8 [N, KB]");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32, "scales/zeros: float32");
  TORCH_CHECK(scales.is_contiguous() && zeros.is_contiguous(), "scales/zeros: contiguous");
  TORCH_CHECK(group > 0 && group % 32 == 0, "group must be a multiple of 32");
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0, N = w.size(0), KB = w.size(1), G = scales.size(1);
  TORCH_CHECK(2 * KB >= K && scales.size(0) == N && zeros.size(0) == N && zeros.size(1) == G, "shape mismatch");
  TORCH_CHECK(G == (K + group - 1) / group, "groups do not match K");
  return {K, M, N, KB, G};
}

// The bias as a pointer (null when there is none), after checking it is contiguous float32 [N].
static const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->numel() == N && bias->is_contiguous(),
              "bias: contiguous float32 [N]");
  return bias->data_ptr<float>();
}

// x's shape with its last dimension N, and an uninitialised float32 output of that shape.
static std::vector<int64_t> shape_for(const torch::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

static torch::Tensor output_for(const torch::Tensor& x, int64_t N) { return torch::empty(shape_for(x, N), x.options()); }

torch::Tensor w4a16_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zeros,
                         c10::optional<torch::Tensor> bias, int64_t group) {
  const W4Dims d = check_w4(x, w, scales, zeros, group);
  const int64_t K = d.K, M = d.M, N = d.N, KB = d.KB, G = d.G;
  const float* bp = bias_ptr(bias, N);
  auto y = output_for(x, N);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  constexpr int R = 8;

#ifdef HFQUANT_VNNI
  const int64_t chunks = (KB + kChunkBytes - 1) / kChunkBytes;
  // Per-thread buffers, reused from call to call: a decode step makes hundreds of small calls. Bound to
  // local references, so the worker threads below read the calling thread's buffers, not their own.
  static thread_local std::vector<QuantRow> tls_xa;
  static thread_local ChunkGroups tls_cg;
  std::vector<QuantRow>& xa = tls_xa;
  ChunkGroups& cg = tls_cg;
  if (static_cast<int64_t>(xa.size()) < M) xa.resize(M);
  for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, K, chunks, group, G, xa[m]);
  chunk_groups(chunks, group, G, cg);
  over_row_blocks<R>(M, N, KB, G, wp, sp, zp, bp, yp, [&](const uint8_t* const* rows, const float* const* s,
                                                     const float* const* z, int64_t m, float* out, int64_t count,
                                                     int64_t ahead) {
    if (count == R) {
      cg.uniform ? rows_dot_vnni<R, true>(rows, xa[m], cg, s, z, G, KB, chunks, out, ahead)
                 : rows_dot_vnni<R, false>(rows, xa[m], cg, s, z, G, KB, chunks, out, ahead);
    } else {
      cg.uniform ? rows_dot_vnni<1, true>(rows, xa[m], cg, s, z, G, KB, chunks, out, ahead)
                 : rows_dot_vnni<1, false>(rows, xa[m], cg, s, z, G, KB, chunks, out, ahead);
    }
  });
#else
  // Even and odd columns of x as separate contiguous arrays (zero beyond K), and per-group sums of x.
  std::vector<float> xe(M * KB, 0.f), xo(M * KB, 0.f), xs(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const float v = xp[m * K + k];
      (k % 2 == 0 ? xe : xo)[m * KB + k / 2] = v;
      xs[m * G + k / group] += v;
    }
  }
  const int64_t half = group / 2;
  over_row_blocks<R>(M, N, KB, G, wp, sp, zp, bp, yp, [&](const uint8_t* const* rows, const float* const* s,
                                                     const float* const* z, int64_t m, float* out, int64_t count,
                                                     int64_t ahead) {
    const float* e = xe.data() + m * KB;
    const float* o = xo.data() + m * KB;
    const float* xsm = xs.data() + m * G;
    if (count == R) {
      rows_dot<R>(rows, e, o, s, z, xsm, G, half, KB, out, ahead);
    } else {
      rows_dot<1>(rows, e, o, s, z, xsm, G, half, KB, out, ahead);
    }
  });
#endif
  return y;
}

// Prefill (many rows of x): dequantize W in tiles of rows into a float32 buffer, with the reference's float
// ops ((q - z) * s: a subtraction, then a multiplication, per weight), and multiply each tile with torch's
// float32 GEMM. The weights come from memory as 4-bit codes (8x fewer bytes than float32) and a tile is
// reused from the cache by the GEMM, so the GEMM's arithmetic is the cost, as it is for a float32 Linear.
static void dequant_row(const uint8_t* row, const float* s, const float* z, int64_t K, int64_t group, float* out) {
  int64_t k = 0;
#ifdef __AVX512F__
  // 32 columns (16 bytes, one group at most: groups are multiples of 32) per step; the low nibbles are the
  // even columns, the high nibbles the odd ones, interleaved back into column order with two permutes.
  alignas(64) static const int32_t lo_idx[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  alignas(64) static const int32_t hi_idx[16] = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i il = _mm512_load_si512(lo_idx), ih = _mm512_load_si512(hi_idx), mask = _mm512_set1_epi32(15);
  for (; k + 32 <= K; k += 32) {
    const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
    const __m512 even = _mm512_cvtepi32_ps(_mm512_and_si512(w, mask));
    const __m512 odd = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
    const __m512 sv = _mm512_set1_ps(s[k / group]), zv = _mm512_set1_ps(z[k / group]);
    _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_sub_ps(_mm512_permutex2var_ps(even, il, odd), zv), sv));
    _mm512_storeu_ps(out + k + 16, _mm512_mul_ps(_mm512_sub_ps(_mm512_permutex2var_ps(even, ih, odd), zv), sv));
  }
#elif defined(HFQUANT_AVX2)
  // 16 columns (8 bytes) per step; unpack + lane permutes put the even and odd columns back in order.
  const __m256i mask = _mm256_set1_epi32(15);
  for (; k + 16 <= K; k += 16) {
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2)));
    const __m256 even = _mm256_cvtepi32_ps(_mm256_and_si256(w, mask));
    const __m256 odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4));
    const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
    const __m256 sv = _mm256_set1_ps(s[k / group]), zv = _mm256_set1_ps(z[k / group]);
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_sub_ps(_mm256_permute2f128_ps(lo, hi, 0x20), zv), sv));
    _mm256_storeu_ps(out + k + 8, _mm256_mul_ps(_mm256_sub_ps(_mm256_permute2f128_ps(lo, hi, 0x31), zv), sv));
  }
#endif
  for (; k < K; ++k) {
    const uint8_t b = row[k / 2];
    const float q = static_cast<float>(k % 2 == 0 ? (b & 15) : (b >> 4));
    out[k] = (q - z[k / group]) * s[k / group];
  }
}

torch::Tensor w4a16_dequant_mm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zeros,
                               c10::optional<torch::Tensor> bias, int64_t group, int64_t tile) {
  const W4Dims d = check_w4(x, w, scales, zeros, group);
  const int64_t K = d.K, M = d.M, N = d.N, KB = d.KB, G = d.G;
  TORCH_CHECK(tile > 0, "tile must be positive");
  const auto x2 = x.reshape({M, K});
  auto y = torch::empty({M, N}, x.options());
  auto buf = torch::empty({std::min(tile, N), K}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  float* bufp = buf.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t n1 = std::min(N, n0 + tile);
    at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t n = r0; n < r1; ++n) dequant_row(wp + n * KB, sp + n * G, zp + n * G, K, group, bufp + (n - n0) * K);
    });
    y.narrow(1, n0, n1 - n0).copy_(at::mm(x2, buf.narrow(0, 0, n1 - n0).t()));
  }
  if (bias_ptr(bias, N) != nullptr) y.add_(*bias);
  return y.view(shape_for(x, N));
}

#if defined(HFQUANT_VNNI) || defined(HFQUANT_AVX2)
#define HFQUANT_W8A8_GEMV 1
// The W8A8 GEMV's operands: x [..., K] float32, the int8 weight [N, K], float32 scales and int32 row sums [N].
struct W8Dims {
  int64_t K, M, N;
};

static W8Dims check_w8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& w_scale,
                       const torch::Tensor& w_rowsum) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1 && x.is_contiguous(), "x: contiguous float32 [..., K]");
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 2 && w.is_contiguous(), "w: contiguous int8 [N, K]");
  TORCH_CHECK(w_scale.dtype() == torch::kFloat32 && w_scale.is_contiguous(), "w_scale: contiguous float32 [N]");
  TORCH_CHECK(w_rowsum.dtype() == torch::kInt32 && w_rowsum.is_contiguous(), "w_rowsum: contiguous int32 [N]");
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
torch::Tensor w8a8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor w_scale, torch::Tensor w_rowsum,
                        c10::optional<torch::Tensor> bias, double static_scale) {
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
torch::Tensor w8a8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor w_scale, torch::Tensor w_rowsum,
                        c10::optional<torch::Tensor> bias, double static_scale) {
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
constexpr int GEMM_MR = 3, GEMM_NR = 4;
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

torch::Tensor w8a8_int_gemm(torch::Tensor a, torch::Tensor w) {
  TORCH_CHECK(a.dtype() == torch::kInt8 && a.dim() == 2 && a.is_contiguous(), "a: contiguous int8 [M, K]");
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 2 && w.is_contiguous(), "w: contiguous int8 [N, K]");
  TORCH_CHECK(w.size(1) == a.size(1), "a and w must have the same number of columns");
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  auto c = torch::zeros({M, N}, a.options().dtype(torch::kInt32));
  if (M == 0 || N == 0 || K == 0) return c;
  const auto a16 = a.to(torch::kInt16);
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

// W4A16 (and 8-bit codes, bits == 8) for many rows with 16-bit integer activations (the int8 GEMM's micro-kernel
// shape on 4-bit codes):
// x is rounded per row and quantization group to int16 codes, sx = max|x_g| / 32767 (15 bits relative to the
// group's largest value; bf16 keeps 8 bits), and sum_k q_k x_k of each group is an exact int32 VPMADDWD sum of
// the codes (0..15, widened from their nibbles once per block of W) with those int16 codes. Per group:
//   y += s_g * sx_g * (sum_k q_k xq_k)  -  s_g * z_g * sx_g * (sum_k xq_k),
// the first term in the micro-kernel (float32 vector accumulators, one FMA per group and output), the second,
// for all groups at once, as one small float32 GEMM ([M, G] x [G, N]) after it. The activation codes are
// stored per 32 columns as the 16 even columns, then the 16 odd ones: the order of the low and high nibbles
// of 16 packed bytes, so a block of W widens with one AND and one shift per 32 codes. 8-bit codes (one a byte)
// keep the columns in order.
constexpr int64_t W4I_NB = 64, W4I_KC = 1024;

template <int MR, int NR>
static inline void w4i_micro(const int16_t* a, int64_t lda, const int16_t* b, int64_t chunks_in_group,
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
static inline void w4i_tile_n(int nr, const int16_t* a, int64_t lda, const int16_t* b, int64_t chunks, int64_t groups,
                              int64_t gch, const float* sx, int64_t ldsx, const float* s, int64_t lds, float* c,
                              int64_t ldc) {
  switch (nr) {
    case 4: w4i_micro<MR, 4>(a, lda, b, chunks, groups, gch, sx, ldsx, s, lds, c, ldc); break;
    case 3: w4i_micro<MR, 3>(a, lda, b, chunks, groups, gch, sx, ldsx, s, lds, c, ldc); break;
    case 2: w4i_micro<MR, 2>(a, lda, b, chunks, groups, gch, sx, ldsx, s, lds, c, ldc); break;
    default: w4i_micro<MR, 1>(a, lda, b, chunks, groups, gch, sx, ldsx, s, lds, c, ldc); break;
  }
}

torch::Tensor w4a16_int16_mm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zeros,
                             c10::optional<torch::Tensor> bias, int64_t group, int64_t bits) {
  const W4Dims d = check_w4(x, w, scales, zeros, group);
  const int64_t K = d.K, M = d.M, N = d.N, KB = d.KB, G = d.G;
  TORCH_CHECK(bits == 4 || (bits == 8 && KB >= K), "bits must be 4 (two codes a byte) or 8 (w [N, >= K])");
  // 8-bit codes: one per byte in column order; a group's int32 lanes stay exact up to 2048 columns.
  TORCH_CHECK(bits == 4 || group <= 2048, "8-bit codes: groups of at most 2048 columns");
  const int64_t K32 = (K + 31) / 32 * 32, gch = group / 32;
  auto y = torch::zeros({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(shape_for(x, N));
  // x -> int16 codes per row and group, in the nibbles' column order; sx and the codes' sums per row and group.
  auto a16 = torch::zeros({M, K32}, x.options().dtype(torch::kInt16));
  auto sx_t = torch::empty({M, G}, x.options());
  auto xsum_t = torch::empty({M, G}, x.options());
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
  const int64_t groups_per_block = std::max<int64_t>(1, W4I_KC / group);
  const int64_t blocks = (N + W4I_NB - 1) / W4I_NB;
  at::parallel_for(0, blocks, 1, [&](int64_t blk0, int64_t blk1) {
    // The widened block: per group of GEMM_NR rows and chunk of 32 columns, per row the 16 even then the 16 odd
    // columns' codes as int16.
    std::vector<__m256i> buf_vectors(W4I_NB * groups_per_block * group / 16);
    int16_t* buf = reinterpret_cast<int16_t*>(buf_vectors.data());
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t n0 = blk * W4I_NB, n1 = std::min(N, n0 + W4I_NB);
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
              case 3: w4i_tile_n<3>(nr, a, K32, b, chunks, g1 - g0, gch, sxb, G, sb, G, c, N); break;
              case 2: w4i_tile_n<2>(nr, a, K32, b, chunks, g1 - g0, gch, sxb, G, sb, G, c, N); break;
              default: w4i_tile_n<1>(nr, a, K32, b, chunks, g1 - g0, gch, sxb, G, sb, G, c, N); break;
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

// A float32 Linear whose weight is stored in 16 bits (bfloat16 or float16 bit patterns, int16 [N, K]) because its
// values are exactly 16-bit ones (a float32 model loaded from a bf16/fp16 checkpoint): y = x @ W^T + b in float32,
// each weight widened to float32 in registers (bf16: a 16-bit shift; fp16: F16C's VCVTPH2PS), FMA accumulation.
// For few rows of x (decode): the weight is read once per call, half the bytes of a float32 GEMV. Blocks of R
// rows of W, each multiplied with every row of x while it is in cache; 2 vectors of K per step (2R independent
// FMA chains).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define HFQUANT_HALF_GEMV 1
#ifdef __AVX512F__
using hvec = __m512;
constexpr int64_t kHalfLanes = 16;
static inline hvec hv_zero() { return _mm512_setzero_ps(); }
static inline hvec hv_loadx(const float* p) { return _mm512_loadu_ps(p); }
static inline hvec hv_fma(hvec a, hvec b, hvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hv_sum(hvec v) { return _mm512_reduce_add_ps(v); }
template <bool BF16>
static inline hvec hv_loadw(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  return _mm512_cvtph_ps(v);
}
#else
using hvec = __m256;
constexpr int64_t kHalfLanes = 8;
static inline hvec hv_zero() { return _mm256_setzero_ps(); }
static inline hvec hv_loadx(const float* p) { return _mm256_loadu_ps(p); }
static inline hvec hv_fma(hvec a, hvec b, hvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hv_sum(hvec v) { return hsum256(v); }
template <bool BF16>
static inline hvec hv_loadw(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  return _mm256_cvtph_ps(v);
}
#endif

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
  constexpr int R = 4;
  constexpr int64_t step = 2 * kHalfLanes;
  const int64_t Kv = K / step * step;
  const int64_t blocks = (N + R - 1) / R;
  at::parallel_for(0, blocks, 16, [&](int64_t blk0, int64_t blk1) {
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t n0 = blk * R, count = std::min<int64_t>(R, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float out[R];
        if (count == R) {
          hvec a0[R], a1[R];
          for (int r = 0; r < R; ++r) a0[r] = a1[r] = hv_zero();
          for (int64_t k = 0; k < Kv; k += step) {
            const hvec x0 = hv_loadx(xr + k), x1 = hv_loadx(xr + k + kHalfLanes);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
              const uint16_t* row = wp + (n0 + r) * K + k;
              a0[r] = hv_fma(hv_loadw<BF16>(row), x0, a0[r]);
              a1[r] = hv_fma(hv_loadw<BF16>(row + kHalfLanes), x1, a1[r]);
            }
          }
          for (int r = 0; r < R; ++r) out[r] = hv_sum(a0[r]) + hv_sum(a1[r]);
        } else {
          for (int64_t r = 0; r < count; ++r) {
            hvec a0 = hv_zero(), a1 = hv_zero();
            const uint16_t* row = wp + (n0 + r) * K;
            for (int64_t k = 0; k < Kv; k += step) {
              a0 = hv_fma(hv_loadw<BF16>(row + k), hv_loadx(xr + k), a0);
              a1 = hv_fma(hv_loadw<BF16>(row + k + kHalfLanes), hv_loadx(xr + k + kHalfLanes), a1);
            }
            out[r] = hv_sum(a0) + hv_sum(a1);
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
torch::Tensor half_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, bool bf16) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1 && x.is_contiguous(), "x: contiguous float32 [..., K]");
  TORCH_CHECK(w.dtype() == torch::kInt16 && w.dim() == 2 && w.is_contiguous(), "w: contiguous int16 [N, K]");
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

std::string path() {
#ifdef HFQUANT_VNNI
  return "avx512-vnni";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(HFQUANT_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// Shape-only versions for torch.compile's fake tensors (the Meta dispatch key): the output of each op is
// x's shape with its last dimension N, in x's dtype.
static torch::Tensor w4a16_meta(torch::Tensor x, torch::Tensor w, torch::Tensor, torch::Tensor,
                                c10::optional<torch::Tensor>, int64_t) {
  return output_for(x, w.size(0));
}

static torch::Tensor w4a16_mm_meta(torch::Tensor x, torch::Tensor w, torch::Tensor, torch::Tensor,
                                   c10::optional<torch::Tensor>, int64_t, int64_t) {
  return output_for(x, w.size(0));
}

#ifdef HFQUANT_W8A8_GEMV
static torch::Tensor w8a8_meta(torch::Tensor x, torch::Tensor w, torch::Tensor, torch::Tensor,
                               c10::optional<torch::Tensor>, double) {
  return output_for(x, w.size(0));
}
#endif
#ifdef HFQUANT_HALF_GEMV
static torch::Tensor half_gemv_meta(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor>, bool) {
  return output_for(x, w.size(0));
}
#endif
#ifdef HFQUANT_INT_GEMM
static torch::Tensor int_gemm_meta(torch::Tensor a, torch::Tensor w) {
  return torch::empty({a.size(0), w.size(0)}, a.options().dtype(torch::kInt32));
}
#endif

// The same functions as torch operators (torch.ops.<extension name>.*), so torch.compile can put them in a
// graph: the Python bindings below are for eager calls (less dispatch overhead), the operators for compiled
// code. The namespace is the extension's name, so differently compiled copies can be loaded side by side.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("w4a16_gemv(Tensor x, Tensor w, Tensor scales, Tensor zeros, Tensor? bias, int group) -> Tensor");
  m.def("w4a16_dequant_mm(Tensor x, Tensor w, Tensor scales, Tensor zeros, Tensor? bias, int group, "
        "int tile) -> Tensor");
#ifdef HFQUANT_W8A8_GEMV
  m.def("w8a8_gemv(Tensor x, Tensor w, Tensor w_scale, Tensor w_rowsum, Tensor? bias, float static_scale) "
        "-> Tensor");
#endif
#ifdef HFQUANT_INT_GEMM
  m.def("w8a8_int_gemm(Tensor a, Tensor w) -> Tensor");
  m.def("w4a16_int16_mm(Tensor x, Tensor w, Tensor scales, Tensor zeros, Tensor? bias, int group, int bits) "
        "-> Tensor");
#endif
#ifdef HFQUANT_HALF_GEMV
  m.def("half_gemv(Tensor x, Tensor w, Tensor? bias, bool bf16) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("w4a16_gemv", &w4a16_gemv);
  m.impl("w4a16_dequant_mm", &w4a16_dequant_mm);
#ifdef HFQUANT_W8A8_GEMV
  m.impl("w8a8_gemv", &w8a8_gemv);
#endif
#ifdef HFQUANT_INT_GEMM
  m.impl("w8a8_int_gemm", &w8a8_int_gemm);
  m.impl("w4a16_int16_mm", &w4a16_int16_mm);
#endif
#ifdef HFQUANT_HALF_GEMV
  m.impl("half_gemv", &half_gemv);
#endif
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, Meta, m) {
  m.impl("w4a16_gemv", &w4a16_meta);
  m.impl("w4a16_dequant_mm", &w4a16_mm_meta);
#ifdef HFQUANT_W8A8_GEMV
  m.impl("w8a8_gemv", &w8a8_meta);
#endif
#ifdef HFQUANT_INT_GEMM
  m.impl("w8a8_int_gemm", &int_gemm_meta);
  m.impl("w4a16_int16_mm", &w4a16_mm_meta);
#endif
#ifdef HFQUANT_HALF_GEMV
  m.impl("half_gemv", &half_gemv_meta);
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w4a16_gemv", &w4a16_gemv, "hfquant W4A16 float32 GEMV (few rows)");
  m.def("w4a16_dequant_mm", &w4a16_dequant_mm, "hfquant W4A16 float32 matmul for many rows: tiles of W dequantized, torch GEMM");
#ifdef HFQUANT_W8A8_GEMV
  m.def("w8a8_gemv", &w8a8_gemv, "hfquant W8A8 GEMV (few rows), numerics of hfquant.kernels.w8a8");
#endif
#ifdef HFQUANT_INT_GEMM
  m.def("w8a8_int_gemm", &w8a8_int_gemm, "exact int8 x int8 -> int32 GEMM a @ w^T (VPMADDWD), for CPUs without VNNI");
  m.def("w4a16_int16_mm", &w4a16_int16_mm, "W4A16/W8A16 for many rows: x as int16 codes per group, VPMADDWD with the codes");
#endif
#ifdef HFQUANT_HALF_GEMV
  m.def("half_gemv", &half_gemv, "float32 Linear with a 16-bit (bf16 or fp16) stored weight, few rows");
#endif
  m.def("path", &path, "which inner loop was compiled in: avx512-vnni, avx512, avx2 or scalar");
}
