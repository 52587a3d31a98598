// Portable reference kernels and the activation quantizers (llama.cpp's reference algorithms).
#include <cmath>

#include "gguf_kernels.h"

namespace lite_gguf {

uint16_t f32_to_fp16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u)); // inf / nan
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); // >= 65520 rounds to inf
    if (ax < 0x38800000u) { // below the smallest normal half: value = m * 2^-24, m rounded to even
        float a;
        std::memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)std::nearbyint(a * 16777216.0f));
    }
    const uint32_t r = ax - (112u << 23); // rebias the exponent, then round 23 -> 10 mantissa bits to even
    return (uint16_t)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
}

// quantize_row_q8_0_ref: d = amax / 127 stored as fp16, q = roundf(x / d) (ties away from zero).
void quantize_row_q8_0(const float* x, int64_t K, int8_t* qs, float* d, int32_t* sums) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float* xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = std::fmax(amax, std::fabs(xb[j]));
        const float db = amax / 127.0f;
        const float id = db != 0.0f ? 1.0f / db : 0.0f;
        int32_t s = 0;
        for (int j = 0; j < 32; j++) {
            const int q = (int)std::roundf(xb[j] * id);
            qs[b * 32 + j] = (int8_t)q;
            s += q;
        }
        d[b] = fp16_to_f32(f32_to_fp16(db));
        sums[b] = s;
    }
}

// quantize_row_q8_K_ref: the signed value of largest magnitude (first one) maps to -127, round half to
// even (nearest_int), d = 1 / iscale in float32, bsums over 16 values.
void quantize_row_q8_K(const float* x, int64_t K, int8_t* qs, float* d, int32_t* bsums) {
    for (int64_t b = 0; b < K / 256; b++) {
        const float* xb = x + b * 256;
        int8_t* qb = qs + b * 256;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < 256; j++) {
            const float ax = std::fabs(xb[j]);
            if (ax > amax) {
                amax = ax;
                max = xb[j];
            }
        }
        if (amax == 0.0f) {
            d[b] = 0.0f;
            std::memset(qb, 0, 256);
            for (int j = 0; j < 16; j++) bsums[b * 16 + j] = 0;
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < 256; j++) {
            const int v = (int)std::nearbyint(iscale * xb[j]);
            qb[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < 16; j++) {
            int32_t s = 0;
            for (int i = 0; i < 16; i++) s += qb[j * 16 + i];
            bsums[b * 16 + j] = s;
        }
        d[b] = 1.0f / iscale;
    }
}

namespace scalar {
namespace {

#include "decode_blocks.inc"

// Each kernel: one weight row `wr` against activation row m; returns the float dot product.
float dot_q8_0(const uint8_t* wr, const Acts& a, int64_t m) {
    const int64_t nb = a.K / 32;
    const int8_t* xq = a.qs + m * a.K;
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = wr + b * 34;
        const int8_t* q = (const int8_t*)(blk + 2);
        int32_t s = 0;
        for (int j = 0; j < 32; j++) s += q[j] * xq[b * 32 + j];
        sum += (float)s * (fp16_to_f32(load_u16(blk)) * a.d[m * nb + b]);
    }
    return sum;
}

float dot_q4_0(const uint8_t* wr, const Acts& a, int64_t m) {
    const int64_t nb = a.K / 32;
    const int8_t* xq = a.qs + m * a.K;
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = wr + b * 18;
        const int8_t* xb = xq + b * 32;
        int32_t s = 0;
        for (int j = 0; j < 16; j++) s += ((blk[2 + j] & 0xf) - 8) * xb[j] + ((blk[2 + j] >> 4) - 8) * xb[j + 16];
        sum += (float)s * (fp16_to_f32(load_u16(blk)) * a.d[m * nb + b]);
    }
    return sum;
}

float dot_q5_0(const uint8_t* wr, const Acts& a, int64_t m) {
    const int64_t nb = a.K / 32;
    const int8_t* xq = a.qs + m * a.K;
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = wr + b * 22;
        uint32_t qh;
        std::memcpy(&qh, blk + 2, 4);
        const uint8_t* ql = blk + 6;
        const int8_t* xb = xq + b * 32;
        int32_t s = 0;
        for (int j = 0; j < 16; j++) {
            const int lo = ((ql[j] & 0xf) | (((qh >> j) & 1u) << 4)) - 16;
            const int hi = ((ql[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - 16;
            s += lo * xb[j] + hi * xb[j + 16];
        }
        sum += (float)s * (fp16_to_f32(load_u16(blk)) * a.d[m * nb + b]);
    }
    return sum;
}

float dot_q4_k(const uint8_t* wr, const Acts& a, int64_t m) {
    const int64_t nb = a.K / 256;
    const int8_t* xq = a.qs + m * a.K;
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = wr + b * 144;
        uint8_t sc[8], mn[8];
        unpack_q4_k_scales(blk + 4, sc, mn);
        const uint8_t* q = blk + 16;
        const int8_t* xb = xq + b * 256;
        const int32_t* bs = a.sums + (m * nb + b) * 16;
        int32_t sumi = 0, summs = 0;
        for (int c = 0; c < 4; c++) { // 64 values per chunk: low nibbles, then high nibbles
            int32_t lo = 0, hi = 0;
            for (int j = 0; j < 32; j++) {
                lo += (q[c * 32 + j] & 0xf) * xb[c * 64 + j];
                hi += (q[c * 32 + j] >> 4) * xb[c * 64 + 32 + j];
            }
            sumi += sc[2 * c] * lo + sc[2 * c + 1] * hi;
        }
        for (int j = 0; j < 8; j++) summs += mn[j] * (bs[2 * j] + bs[2 * j + 1]);
        const float xd = a.d[m * nb + b];
        sum += xd * fp16_to_f32(load_u16(blk)) * (float)sumi - xd * fp16_to_f32(load_u16(blk + 2)) * (float)summs;
    }
    return sum;
}

float dot_q6_k(const uint8_t* wr, const Acts& a, int64_t m) {
    const int64_t nb = a.K / 256;
    const int8_t* xq = a.qs + m * a.K;
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = wr + b * 210;
        const int8_t* scales = (const int8_t*)(blk + 192);
        int32_t sumi = 0;
        for (int h = 0; h < 2; h++) { // two halves of 128 values
            const uint8_t* ql = blk + 64 * h;
            const uint8_t* qh = blk + 128 + 32 * h;
            const int8_t* sc = scales + 8 * h;
            const int8_t* xb = xq + b * 256 + 128 * h;
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q0 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) - 32;
                const int q1 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                sumi += sc[is] * q0 * xb[l] + sc[is + 2] * q1 * xb[l + 32] + sc[is + 4] * q2 * xb[l + 64] +
                        sc[is + 6] * q3 * xb[l + 96];
            }
        }
        sum += a.d[m * nb + b] * fp16_to_f32(load_u16(blk + 208)) * (float)sumi;
    }
    return sum;
}

template <float (*Dot)(const uint8_t*, const Acts&, int64_t), int BlockBytes, int BlockSize>
void rows(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t row_bytes = a.K / BlockSize * BlockBytes;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < a.M; m++) y[m * ldy + n] = Dot(w + n * row_bytes, a, m);
}

// Any type with a decoder: decode each block once per weight row, then exact integer dots per activation row
// (ggml_vec_dot_*'s reference: integer sums per block, float scales per block).
template <class D>
void rows_generic(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t nb = a.K / D::QK, row_bytes = nb * D::BYTES;
    Blk<D::QK> o;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < a.M; m++) y[m * ldy + n] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            D::decode(w + n * row_bytes + b * D::BYTES, o);
            for (int64_t m = 0; m < a.M; m++) {
                const int8_t* x = a.qs + m * a.K + b * D::QK;
                int32_t isum = 0;
                for (int g = 0; g < D::QK / 16; g++) {
                    int32_t s = 0;
                    for (int l = 0; l < 16; l++) s += o.q[16 * g + l] * x[16 * g + l];
                    isum += o.sc[g] * s;
                }
                const float xd = a.d[m * nb + b];
                float v = (xd * o.d) * (float)isum;
                if constexpr (D::MIN) v += (xd * o.dmin) * (float)block_imin<D>(o, a, m, b);
                y[m * ldy + n] += v;
            }
        }
    }
}

} // namespace

void q8_0(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows<dot_q8_0, 34, 32>(w, a, y, ldy, n0, n1); }
void q4_0(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows<dot_q4_0, 18, 32>(w, a, y, ldy, n0, n1); }
void q5_0(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows<dot_q5_0, 22, 32>(w, a, y, ldy, n0, n1); }
void q4_K(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows<dot_q4_k, 144, 256>(w, a, y, ldy, n0, n1); }
void q6_K(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows<dot_q6_k, 210, 256>(w, a, y, ldy, n0, n1); }
void q5_1(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows_generic<DecQ5_1>(w, a, y, ldy, n0, n1); }
void iq4_nl(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows_generic<DecIQ4_NL>(w, a, y, ldy, n0, n1); }
void q2_K(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows_generic<DecQ2_K>(w, a, y, ldy, n0, n1); }
void q3_K(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows_generic<DecQ3_K>(w, a, y, ldy, n0, n1); }
void q5_K(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows_generic<DecQ5_K>(w, a, y, ldy, n0, n1); }
void iq4_xs(const uint8_t* w, const Acts& a, float* y, int64_t ldy, int64_t n0, int64_t n1) { rows_generic<DecIQ4_XS>(w, a, y, ldy, n0, n1); }

} // namespace scalar
} // namespace lite_gguf
