// The extension module: which inner loops were compiled in (path), and the kernels of the other files as Python
// functions (for eager calls: the least dispatch overhead) and as torch operators with shape-only Meta versions
// (torch.ops.<extension name>.*, so torch.compile can put them in a graph).
#include <torch/extension.h>

#include "common.h"

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
static torch::Tensor weight_only_meta(torch::Tensor x, torch::Tensor w, torch::Tensor, torch::Tensor,
                                      c10::optional<torch::Tensor>, int64_t) {
  return output_for(x, w.size(0));
}

static torch::Tensor weight_only_mm_meta(torch::Tensor x, torch::Tensor w, torch::Tensor, torch::Tensor,
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
  m.def("weight_only_gemv(Tensor x, Tensor w, Tensor scales, Tensor zeros, Tensor? bias, int group) -> Tensor");
  m.def("weight_only_dequant_mm(Tensor x, Tensor w, Tensor scales, Tensor zeros, Tensor? bias, int group, "
        "int tile) -> Tensor");
#ifdef HFQUANT_W8A8_GEMV
  m.def("w8a8_gemv(Tensor x, Tensor w, Tensor w_scale, Tensor w_rowsum, Tensor? bias, float static_scale) "
        "-> Tensor");
#endif
#ifdef HFQUANT_INT_GEMM
  m.def("w8a8_int_gemm(Tensor a, Tensor w) -> Tensor");
  m.def("weight_only_int16_mm(Tensor x, Tensor w, Tensor scales, Tensor zeros, Tensor? bias, int group, int bits) "
        "-> Tensor");
#endif
#ifdef HFQUANT_HALF_GEMV
  m.def("half_gemv(Tensor x, Tensor w, Tensor? bias, bool bf16) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("weight_only_gemv", &weight_only_gemv);
  m.impl("weight_only_dequant_mm", &weight_only_dequant_mm);
#ifdef HFQUANT_W8A8_GEMV
  m.impl("w8a8_gemv", &w8a8_gemv);
#endif
#ifdef HFQUANT_INT_GEMM
  m.impl("w8a8_int_gemm", &w8a8_int_gemm);
  m.impl("weight_only_int16_mm", &weight_only_int16_mm);
#endif
#ifdef HFQUANT_HALF_GEMV
  m.impl("half_gemv", &half_gemv);
#endif
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, Meta, m) {
  m.impl("weight_only_gemv", &weight_only_meta);
  m.impl("weight_only_dequant_mm", &weight_only_mm_meta);
#ifdef HFQUANT_W8A8_GEMV
  m.impl("w8a8_gemv", &w8a8_meta);
#endif
#ifdef HFQUANT_INT_GEMM
  m.impl("w8a8_int_gemm", &int_gemm_meta);
  m.impl("weight_only_int16_mm", &weight_only_mm_meta);
#endif
#ifdef HFQUANT_HALF_GEMV
  m.impl("half_gemv", &half_gemv_meta);
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weight_only_gemv", &weight_only_gemv, "hfquant weight-only (4-bit codes, or 8-bit as nibbles) float32 GEMV "
        "(few rows)");
  m.def("weight_only_dequant_mm", &weight_only_dequant_mm,
        "hfquant weight-only float32 matmul for many rows: tiles of W dequantized, torch GEMM");
#ifdef HFQUANT_W8A8_GEMV
  m.def("w8a8_gemv", &w8a8_gemv, "hfquant W8A8 GEMV (few rows), numerics of hfquant.kernels.w8a8");
#endif
#ifdef HFQUANT_INT_GEMM
  m.def("w8a8_int_gemm", &w8a8_int_gemm, "exact int8 x int8 -> int32 GEMM a @ w^T (VPMADDWD), for CPUs without VNNI");
  m.def("weight_only_int16_mm", &weight_only_int16_mm,
        "weight-only 4/8-bit codes for many rows: x as int16 codes per group, VPMADDWD with the codes");
#endif
#ifdef HFQUANT_HALF_GEMV
  m.def("half_gemv", &half_gemv, "float32 Linear with a 16-bit (bf16 or fp16) stored weight, few rows");
#endif
  m.def("path", &path, "which inner loop was compiled in: avx512-vnni, avx512, avx2 or scalar");
}
