// AVX2 + FMA + F16C variant of the SIMD kernels (any x86-64 CPU since ~2013).
#include "gguf_kernels.h"

#if LITE_X86
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace lite_gguf {
namespace avx2 {
#define LITE_VNNI 0
#include "kernels_simd.inc"
#undef LITE_VNNI
} // namespace avx2
} // namespace lite_gguf

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif // no x86: the table has no entries for this ISA
