// AVX2 + FMA + F16C variant of the SIMD kernels (any x86-64 CPU since ~2013).
#include "gguf_kernels.h"

#if LITE_X86
#include <immintrin.h>

LITE_TARGET_PUSH("avx2,fma,f16c")

namespace lite_gguf {
namespace avx2 {
#define LITE_VNNI 0
#include "kernels_simd.inc"
#undef LITE_VNNI
} // namespace avx2
} // namespace lite_gguf

LITE_TARGET_POP

#endif // no x86: the table has no entries for this ISA
