// The 32-value block quantizers (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): llama.cpp's quantize_row_*_ref, which
// gguf-py's numpy quantizers also follow. The table of every type lite writes is type_traits.cpp.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "gguf_kernels.h"

namespace lite_gguf {

namespace {

// The first value of largest magnitude (its sign kept), as the reference's `if (amax < fabsf(v))` loop.
inline float signed_absmax(const float* x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        const float v = x[j];
        if (amax < std::fabs(v)) {
            amax = std::fabs(v);
            max = v;
        }
    }
    return max;
}

inline void min_max(const float* x, int n, float& min, float& max) {
    min = FLT_MAX;
    max = -FLT_MAX;
    for (int j = 0; j < n; j++) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
}

} // namespace

void quantize_q8_0(const float* x, void* out, int64_t nb) {
    block_q8_0* y = (block_q8_0*)out;
    for (int64_t i = 0; i < nb; i++, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++) amax = amax > std::fabs(x[j]) ? amax : std::fabs(x[j]); // MAX(amax, |v|)
        const float d = amax / ((1 << 7) - 1);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = f32_to_fp16(d);
        for (int j = 0; j < QK8_0; j++) y[i].qs[j] = (int8_t)trunc_int(std::roundf(x[j] * id));
    }
}

void quantize_q4_0(const float* x, void* out, int64_t nb) {
    block_q4_0* y = (block_q4_0*)out;
    for (int64_t i = 0; i < nb; i++, x += QK4_0) {
        const float d = signed_absmax(x, QK4_0) / -8;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = f32_to_fp16(d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            const int xi0 = std::min(15, (int)(int8_t)trunc_int(x[j] * id + 8.5f));
            const int xi1 = std::min(15, (int)(int8_t)trunc_int(x[QK4_0 / 2 + j] * id + 8.5f));
            y[i].qs[j] = (uint8_t)((uint8_t)xi0 | ((uint8_t)xi1 << 4));
        }
    }
}

void quantize_q4_1(const float* x, void* out, int64_t nb) {
    block_q4_1* y = (block_q4_1*)out;
    for (int64_t i = 0; i < nb; i++, x += QK4_1) {
        float min, max;
        min_max(x, QK4_1, min, max);
        const float d = (max - min) / ((1 << 4) - 1);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = f32_to_fp16(d);
        y[i].m = f32_to_fp16(min);
        for (int j = 0; j < QK4_1 / 2; j++) {
            const int xi0 = std::min(15, (int)(int8_t)trunc_int((x[j] - min) * id + 0.5f));
            const int xi1 = std::min(15, (int)(int8_t)trunc_int((x[QK4_1 / 2 + j] - min) * id + 0.5f));
            y[i].qs[j] = (uint8_t)((uint8_t)xi0 | ((uint8_t)xi1 << 4));
        }
    }
}

// Q5_0 (signed, offset 16) and Q5_1 (scale and minimum): 4 low bits in qs, the 5th bit of value j in bit j of qh.
namespace {
template <bool WithMin>
void quantize_q5(const float* x, void* out, int64_t nb) {
    constexpr int qk = 32;
    for (int64_t i = 0; i < nb; i++, x += qk) {
        float min = 0.0f, d;
        uint8_t *qs, *qhp;
        if constexpr (WithMin) {
            block_q5_1* y = (block_q5_1*)out + i;
            float max;
            min_max(x, qk, min, max);
            d = (max - min) / ((1 << 5) - 1);
            y->d = f32_to_fp16(d);
            y->m = f32_to_fp16(min);
            qs = y->qs, qhp = y->qh;
        } else {
            block_q5_0* y = (block_q5_0*)out + i;
            d = signed_absmax(x, qk) / -16;
            y->d = f32_to_fp16(d);
            qs = y->qs, qhp = y->qh;
        }
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint32_t qh = 0;
        for (int j = 0; j < qk / 2; j++) {
            int xi0, xi1;
            if constexpr (WithMin) {
                xi0 = (uint8_t)trunc_int((x[j] - min) * id + 0.5f);
                xi1 = (uint8_t)trunc_int((x[qk / 2 + j] - min) * id + 0.5f);
            } else {
                xi0 = (uint8_t)std::min(31, (int)(int8_t)trunc_int(x[j] * id + 16.5f));
                xi1 = (uint8_t)std::min(31, (int)(int8_t)trunc_int(x[qk / 2 + j] * id + 16.5f));
            }
            qs[j] = (uint8_t)((xi0 & 0x0F) | ((xi1 & 0x0F) << 4));
            qh |= ((uint32_t)(xi0 & 0x10) >> 4) << j;
            qh |= ((uint32_t)(xi1 & 0x10) >> 4) << (j + qk / 2);
        }
        std::memcpy(qhp, &qh, 4);
    }
}

} // namespace

void quantize_q5_0(const float* x, void* out, int64_t nb) { quantize_q5<false>(x, out, nb); }
void quantize_q5_1(const float* x, void* out, int64_t nb) { quantize_q5<true>(x, out, nb); }

} // namespace lite_gguf
