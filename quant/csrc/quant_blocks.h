// GGML block layouts and the quantizers that write them: llama.cpp's reference algorithms (ggml-quants.c,
// `quantize_row_*_ref`, no importance matrix), so the bytes are llama.cpp's bytes.
//
// Exactness: every float operation is the same single-rounded IEEE float32 operation, in the same order, as in
// the C reference. These files are compiled without FMA (no -mfma, no target("fma")), so the compiler cannot
// contract a*b+c; `nearest_int` is ggml's magic-number rounding, bit for bit. The K-quant searches run eight
// sub-blocks side by side in vector lanes, each lane doing exactly the reference's sequential loop.
#pragma once
#include <cstdint>
#include <cstring>

#include "gguf_kernels.h"

namespace lite_gguf {

enum QuantType : int { QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q5_0 = 6, QT_Q5_1 = 7, QT_Q8_0 = 8, QT_Q4_K = 12,
                       QT_Q5_K = 13, QT_Q6_K = 14 };

constexpr int QK4_0 = 32, QK4_1 = 32, QK5_0 = 32, QK5_1 = 32, QK8_0 = 32, QK_K = 256, K_SCALE_SIZE = 12;

struct block_q4_0 { uint16_t d; uint8_t qs[QK4_0 / 2]; };
struct block_q4_1 { uint16_t d, m; uint8_t qs[QK4_1 / 2]; };
struct block_q5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]; };
struct block_q5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[QK5_1 / 2]; };
struct block_q8_0 { uint16_t d; int8_t qs[QK8_0]; };
struct block_q4_K { uint16_t d, dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qs[QK_K / 2]; };
struct block_q5_K { uint16_t d, dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; };
struct block_q6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; uint16_t d; };

static_assert(sizeof(block_q4_0) == 18, "wrong q4_0 block size/padding");
static_assert(sizeof(block_q4_1) == 20, "wrong q4_1 block size/padding");
static_assert(sizeof(block_q5_0) == 22, "wrong q5_0 block size/padding");
static_assert(sizeof(block_q5_1) == 24, "wrong q5_1 block size/padding");
static_assert(sizeof(block_q8_0) == 34, "wrong q8_0 block size/padding");
static_assert(sizeof(block_q4_K) == 144, "wrong q4_K block size/padding");
static_assert(sizeof(block_q5_K) == 176, "wrong q5_K block size/padding");
static_assert(sizeof(block_q6_K) == 210, "wrong q6_K block size/padding");

// Quantizes `nb` consecutive blocks of x (nb * block values) into `out` (nb blocks).
using QuantizeFn = void (*)(const float* x, void* out, int64_t nb);

struct QuantTraits {
    int qtype;
    int block;        // values per block
    int bytes;        // bytes per block
    QuantizeFn fn;
};

// The table of writable types; nullptr for a type lite cannot write.
const QuantTraits* quant_traits(int qtype);

// ggml's nearest_int: round half to even through the float32 mantissa (exact for |v| < 2^22; beyond that it
// returns the same wrapped bits as ggml does).
inline int nearest_int(float v) {
    float t = v + 12582912.f;
    int i;
    std::memcpy(&i, &t, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

// C's float -> integer conversion (truncation), without undefined behaviour on NaN or out-of-range values.
inline int trunc_int(float v) { return v > -2147483648.f && v < 2147483648.f ? (int)v : 0; }

// The K-quant reference rows (lane-parallel search; see quantize_kquants.cpp).
void quantize_q4_K(const float* x, void* out, int64_t nb);
void quantize_q5_K(const float* x, void* out, int64_t nb);
void quantize_q6_K(const float* x, void* out, int64_t nb);

} // namespace lite_gguf
