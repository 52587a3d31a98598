// Prefill GEMM on 8-bit integers: y[M, N] = x[M, K] @ W[N, K].T with W in GGUF blocks, on AVX512-VNNI.
//
// Why: prefill is bound by arithmetic. oneDNN's bf16 GEMM runs at ~0.9 TFLOP/s on two AVX512-BF16 cores, and
// vpdpbusd does twice the multiply-adds per instruction (64 byte pairs vs 32 bf16 pairs), so an int8 GEMM can be
// twice as fast where the CPU has no AMX. Both operands are 8-bit per chunk of CHUNK values along K:
//   - x per (row, chunk) symmetric: xq = rint(x * 127 / absmax) in [-127, 127], stored as xq + 128 (unsigned,
//     vpdpbusd's first operand), with sx = absmax / 127; llama.cpp's Q8_K is the same idea in blocks of 256;
//   - W decoded from its blocks and requantized the same way per (weight row, chunk): codes wq, scale sw. The
//     rounding step (absmax / 127) is ~8x finer than a 4-bit block's own step: a small addition to the error the
//     file carries, but comparable to the activations' own rounding, so this GEMM's error is ~1.3x that of the
//     8-bit decode kernels (llama.cpp's numerics) and ~3x bf16's (benchmarks/prefill_accuracy.py). CHUNK = 64
//     cut it by a tenth at ~5 % of prefill speed.
// y[m, n] = sum_c sx[m, c] * sw[n, c] * (sum_k (xq + 128) * wq - 128 * sum_k wq), the last sum kept per (n, c).
//
// Shape of the work: W is decoded a panel of 48 rows at a time into the layout vpdpbusd wants (4 consecutive k of
// 16 rows per 64-byte vector), kept in L2 while every row of x passes over it in tiles of 8 x 48 (24 int32
// accumulators). Panels run in parallel, so W is decoded once per call and never expanded in full.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gguf_kernels.h"
#include "weight_checks.h"

namespace lite_gguf {
namespace {
constexpr int64_t CHUNK = 128; // values of K sharing one scale (both operands)
constexpr int MR = 8;          // rows of x per tile
constexpr int64_t NP = 48;         // weight rows per panel (3 vectors of 16)
} // namespace

#if LITE_X86
LITE_TARGET_PUSH("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>
namespace i8 {

static inline int64_t chunks(int64_t K) { return (K + CHUNK - 1) / CHUNK; }

// packs_epi32 / packs_epi16 interleave per 128-bit lane; permuting the dwords by this puts 64 codes back in order
static inline __m512i pack_codes(__m512 a, __m512 b, __m512 c, __m512 d, __m512 inv) {
    // round to nearest even (MXCSR default), as np.rint; |x * inv| <= 127 up to rounding, and the packs saturate
    // to [-128, 127], where -128 cannot occur
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i ab = _mm512_packs_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), _mm512_cvtps_epi32(_mm512_mul_ps(b, inv)));
    const __m512i cd = _mm512_packs_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(c, inv)), _mm512_cvtps_epi32(_mm512_mul_ps(d, inv)));
    return _mm512_permutexvar_epi32(order, _mm512_packs_epi16(ab, cd));
}

static inline float absmax(const float* x, int64_t n) { // n % 64 == 0; four chains, not one
    __m512 m[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < n; k += 64)
        for (int j = 0; j < 4; j++) m[j] = _mm512_max_ps(m[j], _mm512_abs_ps(_mm512_loadu_ps(x + k + 16 * j)));
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])));
}

// Activations: one row of K floats (K % 64 == 0) per chunk: codes + 128 into q, scales (absmax / 127) into s.
static void quantize_row(const float* x, int64_t K, uint8_t* q, float* s) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t c = 0, k0 = 0; k0 < K; c++, k0 += CHUNK) {
        const int64_t n = std::min(K - k0, CHUNK);
        const float amax = absmax(x + k0, n);
        s[c] = amax / 127.0f;
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (int64_t k = k0; k < k0 + n; k += 64) {
            const __m512i b = pack_codes(_mm512_loadu_ps(x + k), _mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(x + k + 32),
                                         _mm512_loadu_ps(x + k + 48), inv);
            _mm512_storeu_si512(q + k, _mm512_xor_si512(b, flip));
        }
    }
}

// 16 x 16 transpose of 32-bit elements: r[i] holds row i; afterwards r[j] holds column j.
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    __m512i s[16]; // s[4g + c], 128-bit lane L: column 4L + c of rows 4g..4g+3
    for (int g = 0; g < 4; g++) {
        s[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        s[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        s[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        s[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int c = 0; c < 4; c++) { // a 4 x 4 transpose of 128-bit lanes across s[c], s[4 + c], s[8 + c], s[12 + c]
        const __m512i u0 = _mm512_shuffle_i32x4(s[c], s[4 + c], 0x44), u1 = _mm512_shuffle_i32x4(s[c], s[4 + c], 0xEE);
        const __m512i u2 = _mm512_shuffle_i32x4(s[8 + c], s[12 + c], 0x44);
        const __m512i u3 = _mm512_shuffle_i32x4(s[8 + c], s[12 + c], 0xEE);
        r[c] = _mm512_shuffle_i32x4(u0, u2, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(u1, u3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
    }
}

// Per-thread scratch, grown on demand and kept: no allocation (or page faults) per panel.
struct Scratch {
    std::vector<float> row;      // [K] one decoded weight row
    std::vector<int8_t> codes;   // [16][K] their codes
    std::vector<int8_t> panel;   // [K / 4][NP][4] the panel in vpdpbusd's layout
    std::vector<float> sw;       // [chunks][NP]
    std::vector<int32_t> corr;   // [chunks][NP] 128 * the chunk's code sum
    std::vector<float> inv;      // [chunks]
};

// Raw pointers into a thread's Scratch: taken once per task, so no loop re-reads a thread_local (a call to
// __tls_get_addr in a shared library).
struct Bufs {
    float* row;
    int8_t* codes;
    int8_t* panel;
    float* sw;
    int32_t* corr;
    float* inv; // [chunks] one row's 127 / absmax
};

// Decodes weight rows [n0, n0 + 16 * nv) into the scratch panel (stride nv * 64 bytes per 4 values of K): 16 rows
// at a time, so the code sums run 16 rows to a vector while the transpose has them.
static void pack_panel(const TypeTraits& t, const uint8_t* raw, int64_t K, int64_t n0, int nv, const Bufs s) {
    const int64_t nch = chunks(K), np = 16 * nv;
    const __m512i ones = _mm512_set1_epi8(1);
    for (int g = 0; g < nv; g++) {
        for (int r = 0; r < 16; r++) { // a row at a time: its floats stay in L1
            const int64_t row = n0 + 16 * g + r;
            float* x = s.row;
            dequantize_rows_f32(t, raw, K, row, row + 1, x, true);
            // all the row's maxima, then all its divisions, then all its codes: independent chains, not one
            // chunk's max -> divide -> codes latency after another
            for (int64_t c = 0; c < nch; c++) s.inv[c] = absmax(x + c * CHUNK, std::min(K - c * CHUNK, CHUNK));
            for (int64_t c = 0; c < nch; c++) {
                const float amax = s.inv[c];
                s.sw[c * np + 16 * g + r] = amax / 127.0f;
                s.inv[c] = amax > 0.0f ? 127.0f / amax : 0.0f;
            }
            for (int64_t k = 0; k < K; k += 64)
                _mm512_storeu_si512(s.codes + r * K + k,
                                    pack_codes(_mm512_loadu_ps(x + k), _mm512_loadu_ps(x + k + 16),
                                               _mm512_loadu_ps(x + k + 32), _mm512_loadu_ps(x + k + 48),
                                               _mm512_set1_ps(s.inv[k / CHUNK])));
        }
        __m512i sum = _mm512_setzero_si512(); // code sums of the 16 rows over the current chunk
        for (int64_t k4 = 0; k4 < K / 4; k4 += 16) { // 64 values (within one chunk) x 16 rows per transpose
            __m512i v[16];
            for (int r = 0; r < 16; r++) v[r] = _mm512_loadu_si512(s.codes + r * K + 4 * k4);
            transpose16(v);
            for (int j = 0; j < 16; j++) {
                _mm512_storeu_si512(s.panel + (k4 + j) * (nv * 64) + 64 * g, v[j]);
                sum = _mm512_dpbusd_epi32(sum, ones, v[j]);
            }
            const int64_t k = 4 * k4 + 64;
            if (k % CHUNK == 0 || k == K) {
                _mm512_storeu_si512(s.corr + (k - 1) / CHUNK * np + 16 * g, _mm512_slli_epi32(sum, 7));
                sum = _mm512_setzero_si512();
            }
        }
    }
}

// out[i, 16 v + l] for i < rows (<= MR), v < NV, over every chunk. a: this tile's activations packed [K / 4][MR][4]
// (unsigned codes), sx: [MR][nch] their scales.
template <int NV>
static void tile(const uint8_t* __restrict a, const float* sx, int64_t nch, const Bufs s, int64_t K,
                 float* out, int64_t ldo, int rows) {
    for (int64_t c = 0; c < nch; c++) {
        __m512i acc[MR][NV];
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_si512();
        const int64_t k0 = c * CHUNK, k1 = std::min(K, k0 + CHUNK);
        const int8_t* __restrict p = s.panel + (k0 / 4) * (NV * 64);
        const uint8_t* __restrict ap = a + (k0 / 4) * (MR * 4);
        for (int64_t k = k0; k < k1; k += 4, p += NV * 64, ap += MR * 4) {
            __m512i w[NV];
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) w[v] = _mm512_loadu_si512(p + 64 * v);
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++) {
                const __m512i b = _mm512_set1_epi32(((const int32_t*)ap)[i]);
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++) acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], b, w[v]);
            }
        }
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            const __m512i corr = _mm512_loadu_si512(s.corr + c * NV * 16 + 16 * v);
            const __m512 sw = _mm512_loadu_ps(s.sw + c * NV * 16 + 16 * v);
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++) {
                if (i >= rows) break;
                const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][v], corr));
                const __m512 sc = _mm512_mul_ps(sw, _mm512_set1_ps(sx[i * nch + c]));
                float* o = out + i * ldo + 16 * v;
                _mm512_storeu_ps(o, c == 0 ? _mm512_mul_ps(f, sc) : _mm512_fmadd_ps(f, sc, _mm512_loadu_ps(o)));
            }
        }
    }
}

// All rows of x against the panel; a: [ceil(M / MR)][K / 4][MR][4] (quantize_acts_u8's layout).
template <int NV>
static void rows_of_x(const uint8_t* a, const float* sx, int64_t M, int64_t K, const Bufs s, float* out,
                      int64_t ldo) {
    const int64_t nch = chunks(K);
    for (int64_t m = 0; m < M; m += MR)
        tile<NV>(a + m * K, sx + m * nch, nch, s, K, out + m * ldo, ldo, (int)std::min<int64_t>(MR, M - m));
}

static void gemm(const uint8_t* a, const float* sx, int64_t M, int64_t K, const TypeTraits& t, const uint8_t* raw,
                 int64_t N, float* out) {
    // Panels of 48 rows reuse each activation broadcast three times; with many threads and few rows (an expert:
    // 1408 rows = 30 panels for 16 threads, two rounds with 14 threads idle in the second) narrower panels give
    // every thread work. The result does not depend on it: each output sums the same products in the same order.
    const int64_t threads = at::get_num_threads(), nch = chunks(K);
    const int64_t np = N >= 3 * threads * NP ? NP : N >= 3 * threads * 32 ? 32 : 16;
    const int64_t panels = (N + np - 1) / np;
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
        thread_local Scratch tls;
        tls.row.resize(std::max<size_t>(tls.row.size(), K));
        tls.codes.resize(std::max<size_t>(tls.codes.size(), 16 * K));
        tls.panel.resize(std::max<size_t>(tls.panel.size(), NP * K));
        tls.sw.resize(std::max<size_t>(tls.sw.size(), NP * nch));
        tls.corr.resize(std::max<size_t>(tls.corr.size(), NP * nch));
        tls.inv.resize(std::max<size_t>(tls.inv.size(), nch));
        const Bufs s{tls.row.data(), tls.codes.data(), tls.panel.data(), tls.sw.data(), tls.corr.data(), tls.inv.data()};
        for (int64_t p = p0; p < p1; p++) {
            const int64_t n0 = p * np;
            const int nv = (int)(std::min(np, N - n0) / 16);
            pack_panel(t, raw, K, n0, nv, s);
            switch (nv) {
            case 3: rows_of_x<3>(a, sx, M, K, s, out + n0, N); break;
            case 2: rows_of_x<2>(a, sx, M, K, s, out + n0, N); break;
            default: rows_of_x<1>(a, sx, M, K, s, out + n0, N); break;
            }
        }
    });
}
} // namespace i8
LITE_TARGET_POP
#endif // LITE_X86

namespace {

bool vnni() {
#if LITE_X86
    return best_isa() >= ISA_AVX512VNNI;
#else
    return false;
#endif
}

// (x [M, K] float32) -> (codes + 128, uint8, packed for the GEMM's tiles of MR rows as [ceil(M / MR)][K / 4][MR][4],
// missing rows zero; scales [M, ceil(K / 256)] float32)
std::tuple<at::Tensor, at::Tensor> quantize_acts_u8(const at::Tensor& x) {
    TORCH_CHECK(vnni(), "quantize_acts_u8 needs AVX512-VNNI");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
                "x must be a contiguous 2-D float32 CPU tensor");
    const int64_t M = x.size(0), K = x.size(1), nch = (K + CHUNK - 1) / CHUNK, tiles = (M + MR - 1) / MR;
    TORCH_CHECK(K % 64 == 0, "K must be a multiple of 64, got ", K);
    at::Tensor q = at::empty({tiles * MR, K}, x.options().dtype(at::kByte)), s = at::empty({M, nch}, x.options());
#if LITE_X86
    const float* xp = x.data_ptr<float>();
    uint8_t* qp = q.data_ptr<uint8_t>();
    float* sp = s.data_ptr<float>();
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
        std::vector<uint8_t> row(K);
        for (int64_t t = t0; t < t1; t++) {
            uint8_t* dst = qp + t * MR * K;
            for (int i = 0; i < MR; i++) {
                const int64_t m = t * MR + i;
                if (m < M) i8::quantize_row(xp + m * K, K, row.data(), sp + m * nch);
                else std::fill(row.begin(), row.end(), (uint8_t)128);
                for (int64_t k4 = 0; k4 < K / 4; k4++) std::memcpy(dst + (k4 * MR + i) * 4, row.data() + 4 * k4, 4);
            }
        }
    });
#endif
    return {q, s};
}

// y [M, N] float32 = dequant(x codes, scales) @ requant(W).T, W (N, K) in GGUF blocks of `qtype` (N % 16 == 0).
at::Tensor int8_linear(const at::Tensor& q, const at::Tensor& s, const at::Tensor& raw, int64_t qtype, int64_t N) {
    TORCH_CHECK(vnni(), "int8_linear needs AVX512-VNNI");
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "q must be contiguous uint8 [M, K]");
    const int64_t M = s.size(0), K = q.size(1), nch = (K + CHUNK - 1) / CHUNK;
    TORCH_CHECK(K % 64 == 0 && N % 16 == 0, "int8_linear needs K % 64 == 0 and N % 16 == 0");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == M * nch, "s must be float32 [M, ", nch, "]");
    TORCH_CHECK(q.size(0) == (M + MR - 1) / MR * MR, "q must come from quantize_acts_u8");
    const TypeTraits* t = &checked_weight(raw, qtype, N, K);
    at::Tensor out = at::empty({M, N}, q.options().dtype(at::kFloat));
#if LITE_X86
    if (M > 0) i8::gemm(q.data_ptr<uint8_t>(), s.data_ptr<float>(), M, K, *t, raw.data_ptr<uint8_t>(), N,
                        out.data_ptr<float>());
#endif
    return out;
}

} // namespace
} // namespace lite_gguf

TORCH_LIBRARY_FRAGMENT(lite_gguf, m) {
    m.def("quantize_acts_u8(Tensor x) -> (Tensor, Tensor)", &lite_gguf::quantize_acts_u8);
    m.def("int8_linear(Tensor q, Tensor s, Tensor raw, int qtype, int N) -> Tensor", &lite_gguf::int8_linear);
}
