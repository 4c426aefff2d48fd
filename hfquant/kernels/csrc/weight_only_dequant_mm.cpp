// Weight-only 4-bit codes for many rows of x (prefill), the "tiles" path (weight_only_dequant_mm): dequantize W in
// tiles of rows into a float32 buffer, with the reference's float ops ((q - z) * s: a subtraction, then a
// multiplication, per weight), and multiply each tile with torch's float32 GEMM. The weights come from memory as
// 4-bit codes (8x fewer bytes than float32) and a tile is reused from the cache by the GEMM, so the GEMM's
// arithmetic is the cost, as it is for a float32 Linear.
#include "common.h"

// One row of W as float32 columns. With vectors (AVX-512 or AVX2, one body for both widths): V::kLanes bytes,
// 2 kLanes columns, per step (one group at most: groups are multiples of 32); the low nibbles are the even
// columns, the high nibbles the odd ones, interleaved back into column order. The rest column by column.
static void dequant_row(const uint8_t* row, const float* s, const float* z, int64_t K, int64_t group, float* out) {
  int64_t k = 0;
#ifdef HFQUANT_FVEC
  using V = FVec;
  constexpr int64_t step = 2 * V::kLanes;
  for (; k + step <= K; k += step) {
    typename V::F even, odd, first, second;
    V::nibbles(row + k / 2, even, odd);
    V::interleave(even, odd, first, second);
    const typename V::F sv = V::set1(s[k / group]), zv = V::set1(z[k / group]);
    V::store(out + k, V::mul(V::sub(first, zv), sv));
    V::store(out + k + V::kLanes, V::mul(V::sub(second, zv), sv));
  }
#endif
  for (; k < K; ++k) {
    const uint8_t b = row[k / 2];
    const float q = static_cast<float>(k % 2 == 0 ? (b & 15) : (b >> 4));
    out[k] = (q - z[k / group]) * s[k / group];
  }
}

at::Tensor weight_only_dequant_mm(at::Tensor x, at::Tensor w, at::Tensor scales, at::Tensor zeros,
                                  c10::optional<at::Tensor> bias, int64_t group, int64_t tile) {
  const WeightOnlyDims d = check_weight_only(x, w, scales, zeros, group);
  const int64_t K = d.K, M = d.M, N = d.N, KB = d.KB, G = d.G;
  TORCH_CHECK(tile > 0, "tile must be positive");
  const auto x2 = x.reshape({M, K});
  auto y = at::empty({M, N}, x.options());
  auto buf = at::empty({std::min(tile, N), K}, x.options());
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
