// AVX512-VNNI variant of the SIMD kernels (Ice Lake, Sapphire Rapids, Zen 4 and later): integer dots with
// vpdpbusd / vpdpwssd on 256-bit vectors (AVX512VL), which keeps clocks high and loads block-sized.
#include "gguf_kernels.h"

#if LITE_X86
#include <immintrin.h>

LITE_TARGET_PUSH("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")

namespace lite_gguf {
namespace avx512 {
#define LITE_VNNI 1
#include "kernels_simd.inc"
#undef LITE_VNNI
} // namespace avx512
} // namespace lite_gguf

LITE_TARGET_POP

#endif // no x86: the table has no entries for this ISA
