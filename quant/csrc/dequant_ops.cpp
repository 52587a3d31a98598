// torch binding of block dequantization: torch.ops.lite_gguf.dequantize_into(raw, qtype, out) writes the (N, K)
// weight held in `raw` (GGUF blocks, row-major) into `out`, float32 or bf16, over torch's intra-op threads.
//
// Why native: prefill multiplies every expert by tens of tokens, where a bf16 GEMM (oneDNN: AVX512-BF16 or AMX)
// runs 3-6x faster than the 8-bit block kernels, provided the weight is expanded fast enough. The torch-level
// dequantizer (quant/formats.py) spends ~4 ns per weight; the hand-written AVX-512 forms below ~0.1 ns, so
// expanding an expert costs a fraction of its GEMM. Every other type (and every type below AVX-512) goes through
// the type table's row dequantizer. Values are bit-identical to gguf-py's before the bf16 rounding.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gguf_kernels.h"
#include "weight_checks.h"

// a*b - c must round twice, as the reference does: no FMA contraction in this translation unit
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace lite_gguf {
namespace {

// float32 -> bf16 with round-to-nearest-even (NaN -> a quiet NaN), as torch's .to(torch.bfloat16).
void to_bf16(const float* x, uint16_t* y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        std::memcpy(&u, &x[i], 4);
        const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
        y[i] = nan ? (uint16_t)0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

// Rows [r0, r1) of an (N, K) weight through the type table's dequantizer, a row at a time.
void table_rows(const TypeTraits& t, const uint8_t* raw, int64_t K, int64_t r0, int64_t r1, void* out, bool bf16) {
    const int64_t nb = K / t.block, row_bytes = nb * t.bytes;
    std::vector<float> tmp(bf16 ? K : 0);
    for (int64_t r = r0; r < r1; r++) {
        float* dst = bf16 ? tmp.data() : (float*)out + r * K;
        t.dequantize(raw + r * row_bytes, dst, nb);
        if (bf16) to_bf16(dst, (uint16_t*)out + r * K, K);
    }
}

} // namespace

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
LITE_TARGET_PUSH("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
#include <immintrin.h>
namespace dq_avx512 {

// Hand-written AVX-512 forms of the types prefill meets most (16 values per step: widen the 4/5/6/8-bit codes to
// int32, convert, scale, round to bf16). 512-bit float intrinsics are builtins with a rounding argument, never
// fused by the compiler, so a*b-c keeps its two roundings and the values stay bit-identical to the reference.
template <bool BF16>
static inline void put16(__m512 v, void* out, int64_t i) {
    if constexpr (BF16) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), _mm512_cvtepi32_epi16(r));
    } else {
        _mm512_storeu_ps((float*)out + i, v);
    }
}

static inline __m512 widen(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }
static inline __m512 widen_s(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)); }

template <bool BF16>
static inline void q4_k(const uint8_t* b, void* out, int64_t o) {
    const float d = fp16_to_f32(load_u16(b)), dmin = fp16_to_f32(load_u16(b + 2));
    uint8_t sc[8], mn[8];
    unpack_q4_k_scales(b + 4, sc, mn);
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int c = 0; c < 4; c++) {
        const __m512 d0 = _mm512_set1_ps(d * (float)sc[2 * c]), m0 = _mm512_set1_ps(dmin * (float)mn[2 * c]);
        const __m512 d1 = _mm512_set1_ps(d * (float)sc[2 * c + 1]), m1 = _mm512_set1_ps(dmin * (float)mn[2 * c + 1]);
        for (int h = 0; h < 2; h++) {
            const __m128i q = _mm_loadu_si128((const __m128i*)(b + 16 + 32 * c + 16 * h));
            const __m512 lo = widen(_mm_and_si128(q, low)), hi = widen(_mm_and_si128(_mm_srli_epi16(q, 4), low));
            put16<BF16>(_mm512_sub_ps(_mm512_mul_ps(d0, lo), m0), out, o + 64 * c + 16 * h);
            put16<BF16>(_mm512_sub_ps(_mm512_mul_ps(d1, hi), m1), out, o + 64 * c + 32 + 16 * h);
        }
    }
}

template <bool BF16, int Offset> // Q4_0 (offset 8) and Q5_0 (16: the fifth bits come from qh)
static inline void q4_5_0(const uint8_t* b, void* out, int64_t o) {
    const __m512 d = _mm512_set1_ps(fp16_to_f32(load_u16(b)));
    const __m128i low = _mm_set1_epi8(0x0f);
    const uint8_t* qs = b + (Offset == 8 ? 2 : 6);
    const __m128i q = _mm_loadu_si128((const __m128i*)qs);
    __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
    if constexpr (Offset == 16) {
        uint32_t qh;
        std::memcpy(&qh, b + 2, 4);
        lo = _mm_or_si128(lo, _mm_maskz_mov_epi8((__mmask16)(qh & 0xffff), _mm_set1_epi8(0x10)));
        hi = _mm_or_si128(hi, _mm_maskz_mov_epi8((__mmask16)(qh >> 16), _mm_set1_epi8(0x10)));
    }
    const __m512 off = _mm512_set1_ps((float)Offset);
    // (q - offset) is exact in float, so subtracting after the conversion equals the reference's integer subtract
    put16<BF16>(_mm512_mul_ps(d, _mm512_sub_ps(widen(lo), off)), out, o);
    put16<BF16>(_mm512_mul_ps(d, _mm512_sub_ps(widen(hi), off)), out, o + 16);
}

template <bool BF16>
static inline void q8_0(const uint8_t* b, void* out, int64_t o) {
    const __m512 d = _mm512_set1_ps(fp16_to_f32(load_u16(b)));
    for (int h = 0; h < 2; h++)
        put16<BF16>(_mm512_mul_ps(widen_s(_mm_loadu_si128((const __m128i*)(b + 2 + 16 * h))), d), out, o + 16 * h);
}

template <bool BF16>
static inline void q6_k(const uint8_t* b, void* out, int64_t o) {
    const float d = fp16_to_f32(load_u16(b + 208));
    const int8_t* scales = (const int8_t*)(b + 192);
    const __m128i low = _mm_set1_epi8(0x0f), three = _mm_set1_epi8(3);
    const __m512 off = _mm512_set1_ps(32.0f);
    for (int r = 0; r < 2; r++)
        for (int j = 0; j < 4; j++)
            for (int h = 0; h < 2; h++) { // 16 values: group r*8 + j*2 + h
                const __m128i ql = _mm_loadu_si128((const __m128i*)(b + r * 64 + (j % 2) * 32 + 16 * h));
                const __m128i qh = _mm_loadu_si128((const __m128i*)(b + 128 + r * 32 + 16 * h));
                const __m128i lo = j / 2 ? _mm_and_si128(_mm_srli_epi16(ql, 4), low) : _mm_and_si128(ql, low);
                __m128i hi;
                switch (j) { // shifts must be immediates
                case 0: hi = qh; break;
                case 1: hi = _mm_srli_epi16(qh, 2); break;
                case 2: hi = _mm_srli_epi16(qh, 4); break;
                default: hi = _mm_srli_epi16(qh, 6); break;
                }
                const __m128i q = _mm_or_si128(lo, _mm_slli_epi16(_mm_and_si128(hi, three), 4));
                const __m512 dg = _mm512_set1_ps(d * (float)scales[r * 8 + j * 2 + h]);
                put16<BF16>(_mm512_mul_ps(dg, _mm512_sub_ps(widen(q), off)), out, o + r * 128 + j * 32 + 16 * h);
            }
}

using FastFn = void (*)(const uint8_t*, void*, int64_t);

template <bool BF16>
static FastFn fast_fn(int qtype) {
    switch (qtype) {
    case 2: return q4_5_0<BF16, 8>;
    case 6: return q4_5_0<BF16, 16>;
    case 8: return q8_0<BF16>;
    case 12: return q4_k<BF16>;
    case 14: return q6_k<BF16>;
    default: return nullptr;
    }
}

// Rows [r0, r1) with the hand-written form of `qtype`; false when it has none.
static bool rows(const uint8_t* raw, int qtype, int bs, int bytes, int64_t K, int64_t r0, int64_t r1, void* out,
                 bool out_bf16) {
    const FastFn fn = out_bf16 ? fast_fn<true>(qtype) : fast_fn<false>(qtype);
    if (!fn) return false;
    const int64_t nb = K / bs, row_bytes = nb * bytes;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t b = 0; b < nb; b++) fn(raw + r * row_bytes + b * bytes, out, r * K + b * bs);
    return true;
}
} // namespace dq_avx512
LITE_TARGET_POP
#endif

// Rows [r0, r1) of an (N, K) weight as float32 into `out` (row r at out + (r - r0) * K): the hand-written AVX-512
// form where `wide` and the type has one, else the type table's. For the int8 prefill GEMM (int8_gemm.cpp).
void dequantize_rows_f32(const TypeTraits& t, const uint8_t* raw, int64_t K, int64_t r0, int64_t r1, float* out,
                         bool wide) {
    const uint8_t* first = raw + r0 * (K / t.block) * t.bytes;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (wide && dq_avx512::rows(first, t.qtype, t.block, t.bytes, K, 0, r1 - r0, out, false)) return;
#endif
    table_rows(t, first, K, 0, r1 - r0, out, false);
}

namespace {

void dequantize_into(const at::Tensor& raw, int64_t qtype, const at::Tensor& out, int64_t isa) {
    TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.device().is_cpu(), "out must be a contiguous 2-D CPU tensor");
    const bool bf16 = out.scalar_type() == at::kBFloat16;
    TORCH_CHECK(bf16 || out.scalar_type() == at::kFloat, "out must be float32 or bfloat16");
    const int64_t N = out.size(0), K = out.size(1);
    const TypeTraits* t = &checked_weight(raw, qtype, N, K);
    const uint8_t* src = raw.data_ptr<uint8_t>();
    void* dst = out.data_ptr();
    // the hand-written forms need AVX-512 (F/BW/VL): the level the kernels detected once, capped by LITE_NATIVE_ISA
    const bool wide = (isa < 0 ? best_isa() : std::min<int64_t>(isa, best_isa())) >= ISA_AVX512VNNI;
    // ~64K values per task: enough to amortise a task, small enough to keep both threads busy on one expert
    const int64_t grain = std::max<int64_t>(1, 65536 / K);
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        if (wide && dq_avx512::rows(src, (int)qtype, t->block, t->bytes, K, r0, r1, dst, bf16)) return;
#endif
        table_rows(*t, src, K, r0, r1, dst, bf16);
    });
}

} // namespace
} // namespace lite_gguf

TORCH_LIBRARY_FRAGMENT(lite_gguf, m) {
    m.def("dequantize_into(Tensor raw, int qtype, Tensor(a!) out, int isa=-1) -> ()", &lite_gguf::dequantize_into);
}
