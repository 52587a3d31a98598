// AVX512-VNNI variant of the SIMD kernels (Ice Lake, Sapphire Rapids, Zen 4 and later): integer dots with
// vpdpbusd / vpdpwssd on 256-bit vectors (AVX512VL), which keeps clocks high and loads block-sized.
#include "gguf_kernels.h"

#if LITE_X86
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif

namespace lite_gguf {
namespace avx512 {
#define LITE_VNNI 1
#include "kernels_simd.inc"
#undef LITE_VNNI
} // namespace avx512
} // namespace lite_gguf

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif // no x86: the table has no entries for this ISA
