// The type table (ggml's type_traits + type_traits_cpu in one): for every GGUF block type lite knows, its block
// geometry, the activation format its kernels take, its block-dot kernel per instruction set, its row dequantizer
// and its reference quantizer. Everything else (ops.cpp's checks and dispatch, quant/native.py's type lists) reads
// this table; adding a type is one row here plus its decoder / kernels.
#include "gguf_kernels.h"

namespace lite_gguf {
namespace {

#include "decode_blocks.inc"

#define LITE_CHECK_DECODER(D, block) static_assert(D::BYTES == sizeof(block), #D " disagrees with " #block);
LITE_CHECK_DECODER(DecQ4_0, block_q4_0)
LITE_CHECK_DECODER(DecQ4_1, block_q4_1)
LITE_CHECK_DECODER(DecQ5_0, block_q5_0)
LITE_CHECK_DECODER(DecQ5_1, block_q5_1)
LITE_CHECK_DECODER(DecQ8_0, block_q8_0)
LITE_CHECK_DECODER(DecIQ4_NL, block_iq4_nl)
LITE_CHECK_DECODER(DecQ2_K, block_q2_K)
LITE_CHECK_DECODER(DecQ3_K, block_q3_K)
LITE_CHECK_DECODER(DecQ4_K, block_q4_K)
LITE_CHECK_DECODER(DecQ5_K, block_q5_K)
LITE_CHECK_DECODER(DecQ6_K, block_q6_K)
LITE_CHECK_DECODER(DecIQ4_XS, block_iq4_xs)

#if LITE_X86
#define KERNELS(t) {scalar::t, avx2::t, avx512::t}
#else
#define KERNELS(t) {scalar::t, nullptr, nullptr}
#endif
#define NO_KERNELS {nullptr, nullptr, nullptr}
#define ROW(T, D, block_t, kernels, quantizer)                                                                     \
    {QT_##T, #T, D::QK, (int)sizeof(block_t), D::Q8K, kernels, dequantize_blocks<D>, quantizer}

const TypeTraits TABLE[] = {
    ROW(Q4_0, DecQ4_0, block_q4_0, KERNELS(q4_0), quantize_q4_0),
    ROW(Q4_1, DecQ4_1, block_q4_1, NO_KERNELS, quantize_q4_1),
    ROW(Q5_0, DecQ5_0, block_q5_0, KERNELS(q5_0), quantize_q5_0),
    ROW(Q5_1, DecQ5_1, block_q5_1, KERNELS(q5_1), quantize_q5_1),
    ROW(Q8_0, DecQ8_0, block_q8_0, KERNELS(q8_0), quantize_q8_0),
    ROW(Q2_K, DecQ2_K, block_q2_K, KERNELS(q2_K), nullptr),
    ROW(Q3_K, DecQ3_K, block_q3_K, KERNELS(q3_K), nullptr),
    ROW(Q4_K, DecQ4_K, block_q4_K, KERNELS(q4_K), quantize_q4_K),
    ROW(Q5_K, DecQ5_K, block_q5_K, KERNELS(q5_K), quantize_q5_K),
    ROW(Q6_K, DecQ6_K, block_q6_K, KERNELS(q6_K), quantize_q6_K),
    ROW(IQ4_NL, DecIQ4_NL, block_iq4_nl, KERNELS(iq4_nl), nullptr),
    ROW(IQ4_XS, DecIQ4_XS, block_iq4_xs, KERNELS(iq4_xs), nullptr),
};

int detect_isa() {
#if LITE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return ISA_AVX512VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

} // namespace

// Chosen once, when the extension is loaded; LITE_NATIVE_ISA / the ops' isa argument can only lower it.
const int BEST_ISA = detect_isa();

int best_isa() { return BEST_ISA; }

const TypeTraits* type_traits(int qtype) {
    for (const TypeTraits& t : TABLE)
        if (t.qtype == qtype) return &t;
    return nullptr;
}

const TypeTraits* type_table(int& count) {
    count = (int)(sizeof(TABLE) / sizeof(TABLE[0]));
    return TABLE;
}

} // namespace lite_gguf
