// Argument checks shared by the torch ops that decode a whole GGUF weight (dequant_ops.cpp, int8_gemm.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include "gguf_kernels.h"

namespace lite_gguf {

// The traits of `qtype`, after checking that `raw` holds an (N, K) weight of it: a type with a row dequantizer,
// rows of whole blocks, N * (K / block) blocks of contiguous bytes.
inline const TypeTraits& checked_weight(const at::Tensor& raw, int64_t qtype, int64_t N, int64_t K) {
    const TypeTraits* t = type_traits((int)qtype);
    TORCH_CHECK(t && t->dequantize, "cannot dequantize GGUF type id ", qtype, " natively");
    TORCH_CHECK(K % t->block == 0, "rows of ", K, " values are not whole blocks of ", t->block);
    const int64_t bytes = N * (K / t->block) * t->bytes;
    TORCH_CHECK(raw.scalar_type() == at::kByte && raw.is_contiguous() && raw.numel() == bytes, "raw must be ", bytes,
                " contiguous bytes, got ", raw.numel());
    return *t;
}

} // namespace lite_gguf
