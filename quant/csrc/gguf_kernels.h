// Shared declarations for the GGUF block kernels and the type table (no torch dependency: the kernel files
// compile fast).
//
// A kernel computes y[m, n] = sum_k W[n, k] * x[m, k] for a range of weight rows n, reading W straight from
// its GGUF blocks and x from 8-bit activations quantized exactly as llama.cpp's quantize_row_q8_0_ref /
// quantize_row_q8_K_ref do. Dot products run in integers; scales are applied per block in float32.
#pragma once
#include <cstdint>
#include <cstring>

#include "quant_blocks.h"

namespace lite_gguf {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LITE_X86 1 // the AVX2 / AVX512 kernel files are compiled
#else
#define LITE_X86 0
#endif

// Compile the functions between LITE_TARGET_PUSH("avx2,fma") and LITE_TARGET_POP for that instruction set (the
// rest of the file stays portable; the ISA is chosen at run time). simdjson's pattern.
#define LITE_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define LITE_TARGET_PUSH(isa) LITE_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define LITE_TARGET_POP LITE_PRAGMA(clang attribute pop)
#else
#define LITE_TARGET_PUSH(isa) LITE_PRAGMA(GCC push_options) LITE_PRAGMA(GCC target(isa))
#define LITE_TARGET_POP LITE_PRAGMA(GCC pop_options)
#endif

// Instruction-set levels, best last.
enum Isa : int { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512VNNI = 2, ISA_COUNT = 3 };

// x quantized per row: Q8_0 (blocks of 32) for 32-value weight types, Q8_K (blocks of 256) for K-quants/IQ4_XS.
struct Acts {
    const int8_t* qs;    // [M][K]
    const float* d;      // [M][K / block] block scales (Q8_0: already rounded through fp16, as stored)
    const int32_t* sums; // Q8_0: [M][K / 32] block sums of qs; Q8_K: [M][K / 16] bsums
    const int16_t* sums32; // [M][K / 32] sums of qs over each 32 values, as int16 (for SIMD madd)
    const int32_t* sums_x8; // Q8_0 only: [M][K / 32 * 8] each block sum repeated 8 times (one per dpbusd lane)
    const float* d_x8;      // Q8_0 only: [M][K / 32 * 8] each block scale repeated 8 times
    int64_t M, K;
};

// Computes y[m * ldy + n] for all m in [0, M) and n in [n0, n1).
using RowsFn = void (*)(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1);
// Dequantizes `nb` consecutive blocks into nb * block floats (bit-identical to gguf.quants.dequantize).
using DequantFn = void (*)(const uint8_t* blocks, float* out, int64_t nb);

// One row per GGUF block type lite knows (ggml's type_traits / type_traits_cpu, in one table).
struct TypeTraits {
    int qtype;              // ggml type id
    const char* name;       // as gguf.GGMLQuantizationType names it
    int block;              // values per block
    int bytes;              // bytes per block (sizeof the block struct)
    bool q8_k;              // activations quantized to Q8_K (blocks of 256), else Q8_0 (blocks of 32)
    RowsFn kernel[ISA_COUNT]; // the block-dot kernel per instruction set; nullptr: none at that level
    DequantFn dequantize;   // nullptr: not dequantized natively
    QuantizeFn quantize;    // llama.cpp's reference quantizer; nullptr: lite cannot write the type
};

// nullptr for a type id not in the table.
const TypeTraits* type_traits(int qtype);
// The whole table: `count` rows.
const TypeTraits* type_table(int& count);
// The best instruction set this CPU runs, detected once (on first use, i.e. when the extension loads).
int best_isa();

// The types with block-dot kernels. Each ISA file defines one function per type in its namespace
// (scalar::q4_0, avx2::q4_0, avx512::q4_0, ...); type_traits.cpp puts their addresses in the table.
#define LITE_KERNEL_TYPES(X) X(q8_0) X(q4_0) X(q5_0) X(q5_1) X(iq4_nl) X(q2_K) X(q3_K) X(q4_K) X(q5_K) X(q6_K) X(iq4_xs)
#define LITE_DECLARE_KERNEL(t) void t(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1);
namespace scalar { LITE_KERNEL_TYPES(LITE_DECLARE_KERNEL) }
#if LITE_X86
namespace avx2 { LITE_KERNEL_TYPES(LITE_DECLARE_KERNEL) }
namespace avx512 { LITE_KERNEL_TYPES(LITE_DECLARE_KERNEL) }
#endif

// Reference activation quantizers (one row of K values).
void quantize_row_q8_0(const float* x, int64_t K, int8_t* qs, float* d, int32_t* sums);
void quantize_row_q8_K(const float* x, int64_t K, int8_t* qs, float* d, int32_t* bsums);

// Rows [r0, r1) of an (N, K) weight in GGUF blocks as float32, row r at out + (r - r0) * K (dequant_ops.cpp);
// `wide`: the hand-written AVX-512 forms may be used.
void dequantize_rows_f32(const TypeTraits& t, const uint8_t* raw, int64_t K, int64_t r0, int64_t r1, float* out,
                         bool wide);

// IEEE half <-> float, round-to-nearest-even (as ggml's GGML_FP32_TO_FP16).
inline float fp16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {
        const float f = (float)man * (1.0f / 16777216.0f); // subnormal: man * 2^-24, exact
        return sign ? -f : f;
    }
    const uint32_t bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint16_t f32_to_fp16(float f);

inline uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

// Q4_K packs eight 6-bit scales and eight 6-bit mins in 12 bytes; unpack to sc[8], mn[8].
// Returns the scales (bytes 0..7 of `sc`) and mins (of `mn`) packed in two 64-bit words.
inline void unpack_q4_k_scales(const uint8_t* s12, uint64_t& sc, uint64_t& mn) {
    uint32_t u[3];
    std::memcpy(u, s12, 12);
    const uint32_t lo6 = 0x3f3f3f3fu, lo4 = 0x0f0f0f0fu, lo2 = 0x03030303u;
    sc = (uint64_t)(u[0] & lo6) | (uint64_t)((u[2] & lo4) | (((u[0] >> 6) & lo2) << 4)) << 32;
    mn = (uint64_t)(u[1] & lo6) | (uint64_t)(((u[2] >> 4) & lo4) | (((u[1] >> 6) & lo2) << 4)) << 32;
}

inline void unpack_q4_k_scales(const uint8_t* s12, uint8_t* sc, uint8_t* mn) {
    uint64_t s, m;
    unpack_q4_k_scales(s12, s, m);
    std::memcpy(sc, &s, 8);
    std::memcpy(mn, &m, 8);
}

} // namespace lite_gguf
