// The torch bindings of the block kernels, and the one place the `lite_gguf` op library is declared
// (TORCH_LIBRARY at the bottom; other files add ops with TORCH_LIBRARY_FRAGMENT, e.g. quantize_ops.cpp):
//   matmul(x, raw, qtype, N, K, isa)   y = x @ W.T with W as raw GGUF blocks: quantizes x once (Q8_0 or Q8_K, as
//                                      the type table says), then runs the type's kernel for the chosen ISA over
//                                      weight rows in parallel with torch's intra-op threads
//   moe_ffn(...)                       one token through k routed experts (gate/up/down) in one call
//   quantize_acts(x, q8_k)             the activation quantizer, exposed for tests
//   dequantize_into(raw, qtype, out)   GGUF blocks -> float32/bf16 rows (dequant_ops.cpp)
//   type_table()                       the type table as ints, read by quant/native.py
//   best_isa()                         the instruction set detected when the extension loaded
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "gguf_kernels.h"

namespace lite_gguf {

namespace {

struct QuantizedX {
    at::Tensor qs, d, sums, sums32, sums_x8, d_x8;
    Acts acts() const {
        return Acts{qs.data_ptr<int8_t>(),      d.data_ptr<float>(),  sums.data_ptr<int32_t>(),
                    sums32.data_ptr<int16_t>(), sums_x8.data_ptr<int32_t>(), d_x8.data_ptr<float>(),
                    qs.size(0),                 qs.size(1)};
    }
};

QuantizedX quantize(const at::Tensor& x, bool q8_k) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor, got ", x.sizes(), " ", x.scalar_type());
    TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU");
    const at::Tensor xc = x.contiguous();
    const int64_t M = xc.size(0), K = xc.size(1), bs = q8_k ? 256 : 32;
    TORCH_CHECK(K % bs == 0, "row length ", K, " is not a multiple of ", bs);
    auto opts = xc.options();
    QuantizedX q{at::empty({M, K}, opts.dtype(at::kChar)), at::empty({M, K / bs}, opts),
                 at::empty({M, K / (q8_k ? 16 : 32)}, opts.dtype(at::kInt)), at::empty({M, K / 32}, opts.dtype(at::kShort)),
                 at::empty({q8_k ? 0 : M, K / 4}, opts.dtype(at::kInt)), at::empty({q8_k ? 0 : M, K / 4}, opts)};
    const float* px = xc.data_ptr<float>();
    int8_t* pq = q.qs.data_ptr<int8_t>();
    float* pd = q.d.data_ptr<float>();
    int32_t* ps = q.sums.data_ptr<int32_t>();
    int16_t* ps32 = q.sums32.data_ptr<int16_t>();
    const int64_t ns = q.sums.size(1);
    auto body = [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; m++) {
            int32_t* s = ps + m * ns;
            if (q8_k)
                quantize_row_q8_K(px + m * K, K, pq + m * K, pd + m * (K / bs), s);
            else
                quantize_row_q8_0(px + m * K, K, pq + m * K, pd + m * (K / bs), s);
            for (int64_t j = 0; j < K / 32; j++) ps32[m * (K / 32) + j] = (int16_t)(q8_k ? s[2 * j] + s[2 * j + 1] : s[j]);
            if (!q8_k) {
                int32_t* sx8 = q.sums_x8.data_ptr<int32_t>() + m * (K / 4);
                float* dx8 = q.d_x8.data_ptr<float>() + m * (K / 4);
                for (int64_t j = 0; j < K / 4; j++) sx8[j] = s[j / 8], dx8[j] = pd[m * (K / bs) + j / 8];
            }
        }
    };
    if (M * K < 32768) body(0, M); // not worth waking the pool
    else at::parallel_for(0, M, 1, body);
    return q;
}

const TypeTraits& traits_of(int64_t qtype) {
    const TypeTraits* t = type_traits((int)qtype);
    TORCH_CHECK(t && t->kernel[ISA_SCALAR], "unsupported GGUF type id ", qtype);
    return *t;
}

// The type's kernel at the best level not above `isa` (-1: the best this CPU runs).
RowsFn pick(int64_t qtype, int64_t isa) {
    const TypeTraits& t = traits_of(qtype);
    for (int64_t level = isa < 0 ? best_isa() : std::min<int64_t>(isa, best_isa()); level >= 0; level--)
        if (t.kernel[level]) return t.kernel[level];
    return t.kernel[ISA_SCALAR];
}

// y[M, N] = x[M, K] @ W[N, K].T with W given as its raw GGUF bytes (N rows of K / block blocks).
at::Tensor matmul(const at::Tensor& x, const at::Tensor& raw, int64_t qtype, int64_t N, int64_t K, int64_t isa) {
    const TypeTraits& t = traits_of(qtype);
    const int bs = t.block;
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "], got ", x.sizes());
    TORCH_CHECK(K % bs == 0, "K=", K, " is not a multiple of the block size ", bs);
    TORCH_CHECK(raw.scalar_type() == at::kByte && raw.is_contiguous() && raw.device().is_cpu(),
                "raw must be a contiguous CPU uint8 tensor");
    const int64_t row_bytes = K / bs * t.bytes;
    TORCH_CHECK(raw.numel() == N * row_bytes, "raw has ", raw.numel(), " bytes, expected ", N * row_bytes);
    const RowsFn fn = pick(qtype, isa);
    const QuantizedX q = quantize(x, t.q8_k);
    const Acts a = q.acts();
    at::Tensor y = at::empty({a.M, N}, x.options());
    float* py = y.data_ptr<float>();
    const uint8_t* pw = raw.data_ptr<uint8_t>();
    // Small jobs stay on the calling thread: waking the pool costs more than ~100 KB of weights.
    if (N * row_bytes < (64 << 10)) fn(pw, a, py, N, 0, N);
    else at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { fn(pw, a, py, N, n0, n1); });
    return y;
}

// Activations of expert e's row inside a k-row quantized batch, as a 1-row Acts.
Acts row_of(const Acts& a, int64_t e, bool q8_k) {
    const int64_t K = a.K, bs = q8_k ? 256 : 32;
    return Acts{a.qs + e * K,
                a.d + e * (K / bs),
                a.sums + e * (K / (q8_k ? 16 : 32)),
                a.sums32 + e * (K / 32),
                q8_k ? nullptr : a.sums_x8 + e * (K / 4),
                q8_k ? nullptr : a.d_x8 + e * (K / 4),
                1,
                K};
}

// Runs fn over rows [0, rows) of each of the k matrices in `raws` in one parallel region.
void experts_parallel(RowsFn fn, const std::vector<const uint8_t*>& raws, const std::vector<Acts>& acts, float* y,
                      int64_t rows) {
    const int64_t k = (int64_t)raws.size();
    at::parallel_for(0, k * rows, 16, [&](int64_t i0, int64_t i1) {
        for (int64_t e = i0 / rows; e < k && e * rows < i1; e++) {
            const int64_t n0 = std::max(i0, e * rows) - e * rows, n1 = std::min(i1, (e + 1) * rows) - e * rows;
            fn(raws[e], acts[e], y + e * rows, rows, n0, n1);
        }
    });
}

std::vector<const uint8_t*> checked_raws(at::TensorList raws, int64_t rows, int64_t K, int64_t qtype,
                                         const char* what) {
    const TypeTraits& t = traits_of(qtype);
    const int bs = t.block;
    TORCH_CHECK(K % bs == 0, what, ": type ", qtype, " cannot hold rows of ", K);
    std::vector<const uint8_t*> out;
    for (const at::Tensor& r : raws) {
        TORCH_CHECK(r.scalar_type() == at::kByte && r.is_contiguous() && r.device().is_cpu(), what, " must be contiguous CPU uint8");
        TORCH_CHECK(r.numel() == rows * (K / bs) * t.bytes, what, " has ", r.numel(), " bytes, expected ",
                    rows * (K / bs) * t.bytes);
        out.push_back(r.data_ptr<uint8_t>());
    }
    return out;
}

// One token through k routed experts: y = sum_e weights[e] * down_e(silu(gate_e x) * up_e x).
// gate_e/up_e are (inter, hidden), down_e (hidden, inter), each as raw GGUF bytes.
at::Tensor moe_ffn(const at::Tensor& x, at::TensorList gate, at::TensorList up, at::TensorList down,
                   const at::Tensor& weights, int64_t gate_qtype, int64_t up_qtype,
                   int64_t down_qtype, int64_t inter, int64_t isa) {
    const int64_t k = (int64_t)gate.size(), hidden = x.numel();
    TORCH_CHECK(k > 0 && (int64_t)up.size() == k && (int64_t)down.size() == k, "need the same number of gate/up/down");
    TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.numel() == k, "weights must be float32 [", k, "]");
    const auto g_raw = checked_raws(gate, inter, hidden, gate_qtype, "gate");
    const auto u_raw = checked_raws(up, inter, hidden, up_qtype, "up");
    const auto d_raw = checked_raws(down, hidden, inter, down_qtype, "down");
    const at::Tensor x2 = x.reshape({1, hidden});
    const bool gk = traits_of(gate_qtype).q8_k, uk = traits_of(up_qtype).q8_k, dk = traits_of(down_qtype).q8_k;
    const QuantizedX qg = quantize(x2, gk);
    const QuantizedX qu = gk == uk ? qg : quantize(x2, uk);
    at::Tensor gu = at::empty({2, k, inter}, x.options());
    float* g = gu.data_ptr<float>();
    float* u = g + k * inter;
    if (gate_qtype == up_qtype) { // one parallel region (one barrier) for all 2k matrices: u follows g
        std::vector<const uint8_t*> gu_raw = g_raw;
        gu_raw.insert(gu_raw.end(), u_raw.begin(), u_raw.end());
        experts_parallel(pick(gate_qtype, isa), gu_raw, std::vector<Acts>(2 * k, qg.acts()), g, inter);
    } else {
        experts_parallel(pick(gate_qtype, isa), g_raw, std::vector<Acts>(k, qg.acts()), g, inter);
        experts_parallel(pick(up_qtype, isa), u_raw, std::vector<Acts>(k, qu.acts()), u, inter);
    }
    for (int64_t i = 0; i < k * inter; i++) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i]; // silu(gate) * up
    const QuantizedX qh = quantize(gu[0], dk);
    std::vector<Acts> h_acts;
    for (int64_t e = 0; e < k; e++) h_acts.push_back(row_of(qh.acts(), e, dk));
    at::Tensor ye = at::empty({k, hidden}, x.options());
    experts_parallel(pick(down_qtype, isa), d_raw, h_acts, ye.data_ptr<float>(), hidden);
    at::Tensor y = at::zeros({hidden}, x.options());
    const float* pe = ye.data_ptr<float>();
    const float* w = weights.contiguous().data_ptr<float>();
    float* py = y.data_ptr<float>();
    for (int64_t e = 0; e < k; e++)
        for (int64_t n = 0; n < hidden; n++) py[n] += w[e] * pe[e * hidden + n];
    return y.reshape(x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_acts(const at::Tensor& x, bool q8_k) {
    const QuantizedX q = quantize(x, q8_k);
    return {q.qs, q.d, q.sums};
}

int64_t best_isa_op() { return best_isa(); }

// [qtype, block, bytes, q8_k, has kernel, can quantize] for every row of the type table, flattened.
std::vector<int64_t> type_table_op() {
    int n = 0;
    const TypeTraits* table = type_table(n);
    std::vector<int64_t> out;
    for (int i = 0; i < n; i++) {
        const TypeTraits& t = table[i];
        out.insert(out.end(), {t.qtype, t.block, t.bytes, t.q8_k, t.kernel[ISA_SCALAR] != nullptr, t.quantize != nullptr});
    }
    return out;
}

} // namespace
} // namespace lite_gguf

TORCH_LIBRARY(lite_gguf, m) {
    m.def("matmul(Tensor x, Tensor raw, int qtype, int N, int K, int isa=-1) -> Tensor", &lite_gguf::matmul);
    m.def("quantize_acts(Tensor x, bool q8_k) -> (Tensor, Tensor, Tensor)", &lite_gguf::quantize_acts);
    m.def("best_isa() -> int", &lite_gguf::best_isa_op);
    m.def("type_table() -> int[]", &lite_gguf::type_table_op);
    m.def("moe_ffn(Tensor x, Tensor[] gate, Tensor[] up, Tensor[] down, Tensor weights, int gate_qtype, int up_qtype, "
          "int down_qtype, int inter, int isa=-1) -> Tensor",
          &lite_gguf::moe_ffn);
}
