// Q4_K, Q5_K and Q6_K quantizers (llama.cpp's reference algorithms; see quantize_kquants.inc), compiled twice:
// for the baseline x86-64 / any CPU, and for AVX2 (eight float lanes per instruction), picked at run time.
// Neither build enables FMA, so no multiply-add is ever fused: the bytes are the same on every CPU.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "gguf_kernels.h"

namespace lite_gguf {

namespace base {
#include "quantize_kquants.inc"
} // namespace base

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
LITE_TARGET_PUSH("avx2")
namespace avx2 {
#include "quantize_kquants.inc"
} // namespace avx2
LITE_TARGET_POP
#define LITE_HAVE_AVX2 1
#endif

namespace {
bool use_avx2() { // LITE_NATIVE_ISA=scalar picks the baseline build (the tests compare the two)
#ifdef LITE_HAVE_AVX2
    static const bool yes = best_isa() >= ISA_AVX2 && !(std::getenv("LITE_NATIVE_ISA") &&
                                                        std::strcmp(std::getenv("LITE_NATIVE_ISA"), "scalar") == 0);
    return yes;
#else
    return false;
#endif
}
} // namespace

#ifdef LITE_HAVE_AVX2
#define LITE_DISPATCH(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define LITE_DISPATCH(fn, ...) base::fn(__VA_ARGS__)
#endif

void quantize_q4_K(const float* x, void* out, int64_t nb) { LITE_DISPATCH(quantize_qk<15>, x, (uint8_t*)out, nb); }
void quantize_q5_K(const float* x, void* out, int64_t nb) { LITE_DISPATCH(quantize_qk<31>, x, (uint8_t*)out, nb); }
void quantize_q6_K(const float* x, void* out, int64_t nb) { LITE_DISPATCH(quantize_q6k, x, (uint8_t*)out, nb); }

} // namespace lite_gguf
