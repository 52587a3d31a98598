// torch binding of the block quantizers: torch.ops.lite_gguf.quantize(x, qtype) -> uint8 [rows, row bytes].
// Blocks are independent, so the work is split over blocks across torch's intra-op threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>

#include "gguf_kernels.h"

namespace lite_gguf {
namespace {

at::Tensor quantize(const at::Tensor& x, int64_t qtype) {
    const TypeTraits* t = type_traits((int)qtype);
    TORCH_CHECK(t && t->quantize, "cannot quantize to GGUF type id ", qtype);
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1,
                "x must be a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
    const at::Tensor xc = x.contiguous();
    const int64_t k = xc.size(-1);
    TORCH_CHECK(k > 0 && k % t->block == 0, "rows of ", k, " values are not whole blocks of ", t->block);
    const int64_t rows = xc.numel() / k, nb = xc.numel() / t->block;
    at::Tensor out = at::empty({rows, k / t->block * t->bytes}, xc.options().dtype(at::kByte));
    const float* px = xc.data_ptr<float>();
    uint8_t* po = out.data_ptr<uint8_t>();
    // ~4K values per task: the K-quant search costs ~1 µs per 256 values, the 32-value types far less
    const int64_t grain = t->block == QK_K ? 16 : 512;
    at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) { t->quantize(px + b0 * t->block, po + b0 * t->bytes, b1 - b0); });
    return out;
}

// Whether every value of a float32 tensor is finite: one pass over the bits (an exponent of all ones is Inf or
// NaN), ~10x faster than torch.isfinite(x).all(), which materialises a bool tensor first.
bool all_finite(const at::Tensor& x) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 CPU tensor");
    const at::Tensor xc = x.contiguous();
    const uint32_t* p = (const uint32_t*)xc.data_ptr<float>();
    std::atomic<bool> ok{true};
    at::parallel_for(0, xc.numel(), 1 << 16, [&](int64_t i0, int64_t i1) {
        uint32_t bad = 0;
        for (int64_t i = i0; i < i1; i++) bad |= (uint32_t)((p[i] & 0x7f800000u) == 0x7f800000u);
        if (bad) ok = false;
    });
    return ok;
}

} // namespace
} // namespace lite_gguf

TORCH_LIBRARY_FRAGMENT(lite_gguf, m) {
    m.def("quantize(Tensor x, int qtype) -> Tensor", &lite_gguf::quantize);
    m.def("all_finite(Tensor x) -> bool", &lite_gguf::all_finite);
}
