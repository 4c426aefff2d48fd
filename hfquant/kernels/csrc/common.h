// hfquant CPU kernels: what every kernel family shares. One extension module, one file per family:
//   weight_only_gemv.cpp        weight-only codes (4-bit, and 8-bit read as two nibbles) for few rows (decode):
//                               y = x @ dequant(W)^T + b, float32 in and out (weight_only_gemv);
//   weight_only_dequant_mm.cpp  weight-only 4-bit codes for many rows (prefill): dequantized tiles of W and
//                               torch's float32 GEMM (weight_only_dequant_mm, the "tiles" path);
//   weight_only_int16_mm.cpp    weight-only 4/8-bit codes for many rows with x as int16 codes
//                               (weight_only_int16_mm, the "int16" path; AVX2 and later);
//   w8a8.cpp                    W8A8: a GEMV for few rows (AVX512-VNNI or AVX2, w8a8_gemv) and an exact int8
//                               GEMM for many rows on CPUs whose torch has no fast one (w8a8_int_gemm, AVX2 and
//                               later);
//   half_gemv.cpp               a float32 Linear whose weight is stored in 16 bits, exactly, for few rows
//                               (half_gemv, AVX2 + F16C and later);
//   ops.cpp                     path() and the registration: Python bindings, torch operators, Meta shapes.
//
// Weights are read in hfquant's own packed layout (hfquant/core/packing.py) viewed as bytes: byte b of a row
// holds the 4-bit codes of columns 2b (low nibble) and 2b+1 (high nibble). Per quantization group g of a
// row, with scale s and zero point z:  sum_k s * (q_k - z) * x_k  =  s * (sum_k q_k * x_k  -  z * sum_k x_k),
// so the inner loops multiply unpacked codes with x, and the scale and zero are applied once per group.
// Rows of W are split across torch's intra-op threads. Inner loops, chosen when compiling (-march=native):
//   * AVX512-VNNI (Cascade Lake and later Xeons, Zen 4): integer dot products over a three-part int8 split
//     of x (rows_dot_vnni); float32-level accuracy (about 2e-6 relative to the float32 reference);
//   * AVX-512F without VNNI (Skylake-X): float32 FMAs over codes converted to float (rows_dot);
//   * AVX2 + FMA without AVX-512 (AMD Zen 2/3, Intel Haswell..Comet Lake; cpu_ext.py builds it with
//     -march=haswell on such CPUs, or to test it on others): the same FMA loop on 256-bit vectors, and a
//     W8A8 GEMV whose int8 dot products are exact 16-bit multiply-adds (VPMADDWD);
//   * otherwise a scalar loop (cpu_ext.py does not use it: torch's int4 kernel is faster there).
// Loops that are the same algorithm at both widths are written once over a vector type (Vec512, Vec256 below;
// FVec is this build's widest); the VNNI loops have no 256-bit counterpart and are written apart.
#pragma once

// ATen's own headers, not torch/extension.h (ops.cpp's): each kernel file compiles in a few seconds.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// The integer dot-product loops (weight-only decode, W8A8 decode) need AVX512-VNNI and AVX512-BW.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HFQUANT_VNNI 1
#endif
// The 256-bit loops: AVX2 and FMA, no AVX-512.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define HFQUANT_AVX2 1
#endif
// The 16-bit integer GEMMs (W8A8, and weight-only codes with int16 activations, for many rows) are built wherever
// AVX2 and FMA are.
#if defined(__AVX2__) && defined(__FMA__)
#define HFQUANT_INT_GEMM 1
#endif
// The W8A8 GEMV: AVX512-VNNI, or AVX2 (w8a8.cpp has one loop for each).
#if defined(HFQUANT_VNNI) || defined(HFQUANT_AVX2)
#define HFQUANT_W8A8_GEMV 1
#endif
// The 16-bit-weight GEMV: AVX-512, or AVX2 with FMA and F16C (VCVTPH2PS).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define HFQUANT_HALF_GEMV 1
#endif

#if defined(__AVX2__) && defined(__FMA__)
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

// 8 float32 lanes (AVX2 + FMA).
struct Vec256 {
  using F = __m256;
  static constexpr int64_t kLanes = 8;
  static inline F zero() { return _mm256_setzero_ps(); }
  static inline F set1(float v) { return _mm256_set1_ps(v); }
  static inline F load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline float sum(F v) { return hsum256(v); }
  // kLanes packed bytes: their low nibbles (even columns) and high nibbles (odd columns) as float32.
  static inline void nibbles(const uint8_t* p, F& lo, F& hi) {
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4));
  }
  // The even and odd columns back in column order: columns 0..kLanes-1 in first, the next kLanes in second
  // (unpack, then lane permutes).
  static inline void interleave(F even, F odd, F& first, F& second) {
    const F lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
    first = _mm256_permute2f128_ps(lo, hi, 0x20);
    second = _mm256_permute2f128_ps(lo, hi, 0x31);
  }
#ifdef __F16C__
  // kLanes 16-bit weights (bfloat16 or float16 bit patterns) widened to float32.
  template <bool BF16>
  static inline F loadw(const uint16_t* p) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    return _mm256_cvtph_ps(v);
  }
#endif
};
#endif

#ifdef __AVX512F__
// 16 float32 lanes (AVX-512F).
struct Vec512 {
  using F = __m512;
  static constexpr int64_t kLanes = 16;
  static inline F zero() { return _mm512_setzero_ps(); }
  static inline F set1(float v) { return _mm512_set1_ps(v); }
  static inline F load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline float sum(F v) { return _mm512_reduce_add_ps(v); }
  static inline void nibbles(const uint8_t* p, F& lo, F& hi) {
    const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
  }
  // Two permutes interleave the even and odd columns.
  static inline void interleave(F even, F odd, F& first, F& second) {
    alignas(64) static const int32_t lo_idx[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    alignas(64) static const int32_t hi_idx[16] = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    first = _mm512_permutex2var_ps(even, _mm512_load_si512(lo_idx), odd);
    second = _mm512_permutex2var_ps(even, _mm512_load_si512(hi_idx), odd);
  }
  template <bool BF16>
  static inline F loadw(const uint16_t* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    return _mm512_cvtph_ps(v);
  }
};
#endif

// This build's widest float vector, for the loops written once for both widths.
#if defined(__AVX512F__)
#define HFQUANT_FVEC 1
using FVec = Vec512;
#elif defined(HFQUANT_AVX2)
#define HFQUANT_FVEC 1
using FVec = Vec256;
#endif

// The 16-bit integer GEMMs' micro-kernel: GEMM_MR rows of x by GEMM_NR rows of W (w8a8.cpp, weight_only_int16_mm.cpp).
constexpr int GEMM_MR = 3, GEMM_NR = 4;

// The weight-only operands: x [..., K] float32, packed codes [N, KB] uint8, float32 scales and zeros [N, G] with
// G = ceil(K / group).
struct WeightOnlyDims {
  int64_t K, M, N, KB, G;
};

inline WeightOnlyDims check_weight_only(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                        const at::Tensor& zeros, int64_t group) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() >= 1 && x.is_contiguous(), "x: contiguous float32 [..., K]");
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w: contiguous uint8 [N, KB]");
  TORCH_CHECK(scales.dtype() == at::kFloat && zeros.dtype() == at::kFloat, "scales/zeros: float32");
  TORCH_CHECK(scales.is_contiguous() && zeros.is_contiguous(), "scales/zeros: contiguous");
  TORCH_CHECK(group > 0 && group % 32 == 0, "group must be a multiple of 32");
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0, N = w.size(0), KB = w.size(1), G = scales.size(1);
  TORCH_CHECK(2 * KB >= K && scales.size(0) == N && zeros.size(0) == N && zeros.size(1) == G, "shape mismatch");
  TORCH_CHECK(G == (K + group - 1) / group, "groups do not match K");
  return {K, M, N, KB, G};
}

// The bias as a pointer (null when there is none), after checking it is contiguous float32 [N].
inline const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dtype() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
              "bias: contiguous float32 [N]");
  return bias->data_ptr<float>();
}

// x's shape with its last dimension N, and an uninitialised float32 output of that shape.
inline std::vector<int64_t> shape_for(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

inline at::Tensor output_for(const at::Tensor& x, int64_t N) { return at::empty(shape_for(x, N), x.options()); }

// The ops (ops.cpp registers them), each defined in its family's file.
at::Tensor weight_only_gemv(at::Tensor x, at::Tensor w, at::Tensor scales, at::Tensor zeros,
                            c10::optional<at::Tensor> bias, int64_t group);
at::Tensor weight_only_dequant_mm(at::Tensor x, at::Tensor w, at::Tensor scales, at::Tensor zeros,
                                  c10::optional<at::Tensor> bias, int64_t group, int64_t tile);
#ifdef HFQUANT_INT_GEMM
at::Tensor weight_only_int16_mm(at::Tensor x, at::Tensor w, at::Tensor scales, at::Tensor zeros,
                                c10::optional<at::Tensor> bias, int64_t group, int64_t bits);
at::Tensor w8a8_int_gemm(at::Tensor a, at::Tensor w);
#endif
#ifdef HFQUANT_W8A8_GEMV
at::Tensor w8a8_gemv(at::Tensor x, at::Tensor w, at::Tensor w_scale, at::Tensor w_rowsum,
                     c10::optional<at::Tensor> bias, double static_scale);
#endif
#ifdef HFQUANT_HALF_GEMV
at::Tensor half_gemv(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, bool bf16);
#endif
