// GGML block layouts (ggml-common.h), one struct per type with its size checked at compile time, and the
// quantizers that write them: llama.cpp's reference algorithms (ggml-quants.c, `quantize_row_*_ref`, no importance
// matrix), so the bytes are llama.cpp's bytes. No torch dependency: the kernel files that include it compile fast.
//
// Exactness: every float operation is the same single-rounded IEEE float32 operation, in the same order, as in
// the C reference. These files are compiled without FMA (no -mfma, no target("fma")), so the compiler cannot
// contract a*b+c; `nearest_int` is ggml's magic-number rounding, bit for bit. The K-quant searches run eight
// sub-blocks side by side in vector lanes, each lane doing exactly the reference's sequential loop.
#pragma once
#include <cstdint>
#include <cstring>

namespace lite_gguf {

// ggml type ids (gguf.GGMLQuantizationType)
enum QType : int {
    QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q5_0 = 6, QT_Q5_1 = 7, QT_Q8_0 = 8, QT_Q2_K = 10, QT_Q3_K = 11, QT_Q4_K = 12,
    QT_Q5_K = 13, QT_Q6_K = 14, QT_IQ4_NL = 20, QT_IQ4_XS = 23,
};

constexpr int QK4_0 = 32, QK4_1 = 32, QK5_0 = 32, QK5_1 = 32, QK8_0 = 32, QK4_NL = 32, QK_K = 256, K_SCALE_SIZE = 12;

struct block_q4_0 { uint16_t d; uint8_t qs[QK4_0 / 2]; };
struct block_q4_1 { uint16_t d, m; uint8_t qs[QK4_1 / 2]; };
struct block_q5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]; };
struct block_q5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[QK5_1 / 2]; };
struct block_q8_0 { uint16_t d; int8_t qs[QK8_0]; };
struct block_iq4_nl { uint16_t d; uint8_t qs[QK4_NL / 2]; };
// K-quants: super-blocks of 256
struct block_q2_K { uint8_t scales[QK_K / 16]; uint8_t qs[QK_K / 4]; uint16_t d, dmin; };
struct block_q3_K { uint8_t hmask[QK_K / 8]; uint8_t qs[QK_K / 4]; uint8_t scales[12]; uint16_t d; };
struct block_q4_K { uint16_t d, dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qs[QK_K / 2]; };
struct block_q5_K { uint16_t d, dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; };
struct block_q6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; uint16_t d; };
struct block_iq4_xs { uint16_t d, scales_h; uint8_t scales_l[QK_K / 64]; uint8_t qs[QK_K / 2]; };

static_assert(sizeof(block_q4_0) == 18, "wrong q4_0 block size/padding");
static_assert(sizeof(block_q4_1) == 20, "wrong q4_1 block size/padding");
static_assert(sizeof(block_q5_0) == 22, "wrong q5_0 block size/padding");
static_assert(sizeof(block_q5_1) == 24, "wrong q5_1 block size/padding");
static_assert(sizeof(block_q8_0) == 34, "wrong q8_0 block size/padding");
static_assert(sizeof(block_iq4_nl) == 18, "wrong iq4_nl block size/padding");
static_assert(sizeof(block_q2_K) == 84, "wrong q2_K block size/padding");
static_assert(sizeof(block_q3_K) == 110, "wrong q3_K block size/padding");
static_assert(sizeof(block_q4_K) == 144, "wrong q4_K block size/padding");
static_assert(sizeof(block_q5_K) == 176, "wrong q5_K block size/padding");
static_assert(sizeof(block_q6_K) == 210, "wrong q6_K block size/padding");
static_assert(sizeof(block_iq4_xs) == 136, "wrong iq4_xs block size/padding");

// The non-linear 4-bit grid of IQ4_NL / IQ4_XS (ggml's kvalues_iq4nl).
constexpr int8_t KVALUES_IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Quantizes `nb` consecutive blocks of x (nb * block values) into `out` (nb blocks).
using QuantizeFn = void (*)(const float* x, void* out, int64_t nb);

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

// The reference rows: 32-value types (quantize_legacy.cpp), K-quants (lane-parallel search, quantize_kquants.cpp).
void quantize_q4_0(const float* x, void* out, int64_t nb);
void quantize_q4_1(const float* x, void* out, int64_t nb);
void quantize_q5_0(const float* x, void* out, int64_t nb);
void quantize_q5_1(const float* x, void* out, int64_t nb);
void quantize_q8_0(const float* x, void* out, int64_t nb);
void quantize_q4_K(const float* x, void* out, int64_t nb);
void quantize_q5_K(const float* x, void* out, int64_t nb);
void quantize_q6_K(const float* x, void* out, int64_t nb);

} // namespace lite_gguf
