// AVX2 + FMA + F16C variant of the SIMD kernels (any x86-64 CPU since ~2013).
#include "gguf_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
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
RowsFn avx2_kernel(int qtype) { return avx2::kernel_for(qtype); }
} // namespace lite_gguf

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else
namespace lite_gguf {
RowsFn avx2_kernel(int) { return nullptr; }
}
#endif
