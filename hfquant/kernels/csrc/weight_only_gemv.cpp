// Weight-only codes for few rows of x (decode): y = x @ dequant(W)^T + b, float32 in and out (weight_only_gemv).
// 4-bit codes; 8-bit codes come in as two nibbles a byte against x spread to (x_k, 16 x_k)
// (hfquant.kernels.weight_only).
// Loops: integer dot products over a three-part int8 split of x with AVX512-VNNI (rows_dot_vnni), else float32
// FMAs over codes converted to float (rows_dot: AVX-512 or AVX2, one body for both widths), else scalar.
#include "common.h"

// One output: sum over groups of s_g * (sum_b lo(b) e[b] + hi(b) o[b]) - sum_g s_g z_g xs_g.
// R rows at once (independent FMA chains; x loaded once for all R), the group scale applied to the vector
// accumulator with one FMA, one horizontal sum per row at the end. V::kLanes packed bytes (2 kLanes columns) per
// row per step.
template <int R>
static inline void rows_dot(const uint8_t* const* rows, const float* e, const float* o, const float* const* s,
                            const float* const* z, const float* xs, int64_t G, int64_t half, int64_t KB,
                            float* out, int64_t ahead = 0) {
#ifdef HFQUANT_FVEC
  using V = FVec;
  typename V::F total[R];
  float corr[R];
  for (int r = 0; r < R; ++r) { total[r] = V::zero(); corr[r] = 0.f; }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t b0 = g * half, b1 = std::min((g + 1) * half, KB);
    typename V::F acc[R];
    for (int r = 0; r < R; ++r) acc[r] = V::zero();
    for (int64_t b = b0; b < b1; b += V::kLanes) {
      const typename V::F ev = V::load(e + b), ov = V::load(o + b);
      if (ahead != 0 && (b & 63) == 0) {
        // Software prefetch of the same cache line of the rows one block ahead: a decode GEMV streams its
        // weights from DRAM once, and the hardware prefetcher alone left this loop waiting on memory.
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + b + ahead), _MM_HINT_T0);
      }
      for (int r = 0; r < R; ++r) {
        typename V::F lo, hi;
        V::nibbles(rows[r] + b, lo, hi);
        acc[r] = V::fma(lo, ev, acc[r]);
        acc[r] = V::fma(hi, ov, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      total[r] = V::fma(V::set1(s[r][g]), acc[r], total[r]);
      corr[r] += s[r][g] * z[r][g] * xs[g];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = V::sum(total[r]) - corr[r];
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
// block and each row m of x, dot(rows, s, z, m, out, count, ahead) writes `count` outputs: count == R for whole
// blocks (independent accumulator chains, x's vectors loaded once for all R rows), or 1 for the rows left over.
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

at::Tensor weight_only_gemv(at::Tensor x, at::Tensor w, at::Tensor scales, at::Tensor zeros,
                            c10::optional<at::Tensor> bias, int64_t group) {
  const WeightOnlyDims d = check_weight_only(x, w, scales, zeros, group);
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
