"""quant.device_kernels: Triton kernels on raw GGUF blocks.

Without a GPU they run in triton's CPU interpreter (TRITON_INTERPRET=1) on fresh random data against
gguf.quants.dequantize of the same bytes and a float64 matmul, both with the interpreter's large tiles and with the
exact tile sizes a GPU would run; and every kernel variant is compiled ahead of time for an H100 (sm_90), so a
compile error shows up here rather than on a user's machine.

Triton fixes interpret-or-compile for its own library (tl.sum, tl.zeros...) when it is first imported, so one
process cannot do both, and setting TRITON_INTERPRET in this process would change every later test module's triton.
So the kernels run only in worker processes (one per mode, started once for this module) that set it before
importing triton; each test sends a check function (defined below, found by name) and a seed to one of them.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quant import formats
from quant.device_kernels import SUPPORTED_QTYPES, ExpertSpec, check_supported, gguf_matmul, moe_ffn
from quant.errors import LiteError

if importlib.util.find_spec("triton") is None:
    pytest.skip("the device kernels are written in Triton, which is not installed", allow_module_level=True)

Q = gguf.GGMLQuantizationType
F16_FIELDS = {
    Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.IQ4_NL: [0], Q.IQ4_XS: [0],
}  # fmt: skip
# types whose test weights are random blocks: those quant.formats cannot write (gguf.quants quantizes none of them)
RANDOM_BLOCKS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS)
# device types whose CPU side (quant.formats) is added separately: the oracle is gguf.quants either way
DEVICE_ONLY = (Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS)
TOL = 1e-4  # of max |reference|: float32 accumulation in another order


def _mode() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def _worker(interpret: bool) -> ProcessPoolExecutor:
    """A fresh process that imports triton with TRITON_INTERPRET=1 (interpret) or unset."""
    saved = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        assert pool.submit(_mode).result() == interpret  # the process starts now, with this environment
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return pool


@pytest.fixture(scope="module")
def interpreter() -> Iterator[ProcessPoolExecutor]:
    pool = _worker(interpret=True)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def compiler() -> Iterator[ProcessPoolExecutor]:
    pool = _worker(interpret=False)
    yield pool
    pool.shutdown()


@pytest.fixture
def seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")  # shown with a failure
    return seed


def run(pool: ProcessPoolExecutor, check: Callable, *args) -> None:
    pool.submit(check, *args).result()  # re-raises the worker's AssertionError


def random_raw(qtype: Q, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """GGUF bytes of an n x k weight: quantized random normals for the types quant.formats writes directly; for the
    K-quants and IQ4 types, random blocks (every bit random) with f16 scale fields of real files' size (|w| up to ~0.3
    for Q4_K)."""
    if qtype not in RANDOM_BLOCKS:
        w = (torch.randn(n, k, generator=gen) * 0.1).numpy()
        if qtype in formats.WRITE_TYPES:
            raw = formats.quantize(w, qtype)
        else:
            raw = np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(raw).reshape(-1))
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    blocks = torch.randint(0, 256, (n * k // bs, ts), dtype=torch.uint8, generator=gen)
    for off in F16_FIELDS[qtype]:
        scale = (torch.rand(blocks.shape[0], 1, generator=gen) * 1.5e-4 + 1e-5).half()
        blocks[:, off : off + 2] = scale.view(torch.uint8)
    return blocks.reshape(-1)


def dequantize(raw: torch.Tensor, qtype: Q, shape: tuple[int, int]) -> torch.Tensor:
    """The oracle: gguf.quants.dequantize of the same bytes, as float64."""
    w = gguf.quants.dequantize(raw.numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64).reshape(shape))


def assert_close(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Within TOL of max |ref|, plus one rounding of the output dtype."""
    eps = 0.0 if y.dtype == torch.float32 else torch.finfo(y.dtype).eps
    err = (y.float() - ref).abs()
    bound = TOL * ref.abs().max() + eps * ref.abs()
    assert bool((err <= bound).all()), f"{what}: max error {err.max():.3g} (max |ref| {ref.abs().max():.3g})"


# ---------------------------------------------------------------------------------------------------------------
# API (no kernel runs)


def test_supported_types_are_the_readable_ones() -> None:
    assert set(SUPPORTED_QTYPES) == set(formats.READ_TYPES) | set(DEVICE_ONLY)
    for qtype in SUPPORTED_QTYPES:
        check_supported(qtype, "w")


def test_check_supported_names_tensor_and_type() -> None:
    with pytest.raises(LiteError, match=r"tensor blk\.3\.ffn_down\.weight has type TQ2_0"):
        check_supported(Q.TQ2_0, "blk.3.ffn_down.weight")


def test_expert_spec_packed_offsets() -> None:
    spec = ExpertSpec.packed(Q.Q4_K, Q.Q4_K, Q.Q5_0, 2048, 1408)
    gate = 1408 * 2048 // 256 * 144
    assert (spec.gate_offset, spec.up_offset) == (0, gate)
    assert spec.down_offset == 2 * gate and spec.nbytes == 2 * gate + 2048 * 1408 // 32 * 22
    odd = ExpertSpec.packed(Q.Q4_0, Q.Q8_0, Q.F32, 32, 1)  # gate 18 bytes, up 34: padded to 16
    assert (odd.up_offset, odd.down_offset, odd.nbytes) == (32, 80, 80 + 32 * 4)


def test_bad_arguments_are_refused_before_any_kernel() -> None:
    raw = torch.zeros(4 * 34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="raw must be"):
        gguf_matmul(torch.zeros(1, 32), raw[:-1], Q.Q8_0, 4, 32)
    with pytest.raises(ValueError, match="not a multiple"):
        gguf_matmul(torch.zeros(1, 48), raw, Q.Q8_0, 4, 48)
    with pytest.raises(LiteError, match="TQ2_0"):
        gguf_matmul(torch.zeros(1, 256), raw, Q.TQ2_0, 1, 256)
    spec = ExpertSpec.packed(Q.Q4_K, Q.Q4_K, Q.Q6_K, 256, 128)  # down rows of 128: not whole Q6_K blocks
    with pytest.raises(ValueError, match="expert down"):
        moe_ffn(torch.zeros(1, 256), torch.zeros(2, 4096, dtype=torch.uint8), torch.zeros(1, 1), torch.ones(1, 1), spec)


# ---------------------------------------------------------------------------------------------------------------
# matmul (checks run in a worker process)


def check_matmul(qtype: Q, seed: int) -> None:
    from quant import triton_blocks

    gen = torch.Generator().manual_seed(seed)
    n, k = 48, 512  # 48: a partial tile for every tile size used
    raw = random_raw(qtype, n, k, gen)
    w = dequantize(raw, qtype, (n, k))
    for m in (1, 5, 64):
        x = torch.randn(m, k, generator=gen)
        ref = x.double() @ w.T
        assert_close(gguf_matmul(x, raw, qtype, n, k), ref, f"M={m}")
        # The exact tile sizes of a GPU (GEMV with BLOCK_K = the type's block; GEMM with BLOCK_K = 32).
        assert_close(triton_blocks.matmul(x, raw, qtype, n, k, interpreter_tiles=False), ref, f"M={m}, GPU tiles")
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(5, k, generator=gen).to(dtype)
        y = gguf_matmul(x, raw, qtype, n, k)
        assert y.dtype == dtype
        assert_close(y, x.double() @ w.T, f"M=5 {dtype}")


def check_matmul_partial_k_tile(seed: int) -> None:
    """k = 1408 (DeepSeek-V2-Lite's expert width) with Q5_0: 44 blocks, K loops end on a partial tile."""
    from quant import triton_blocks

    gen = torch.Generator().manual_seed(seed)
    n, k = 20, 1408
    raw = random_raw(Q.Q5_0, n, k, gen)
    w = dequantize(raw, Q.Q5_0, (n, k))
    for m in (1, 3, 24):
        x = torch.randn(m, k, generator=gen)
        ref = x.double() @ w.T
        assert_close(gguf_matmul(x, raw, Q.Q5_0, n, k), ref, f"M={m}")
        assert_close(triton_blocks.matmul(x, raw, Q.Q5_0, n, k, interpreter_tiles=False), ref, f"M={m}, GPU")


def gemv_with_tiles(x: torch.Tensor, raw: torch.Tensor, qtype: Q, n: int, k: int, bn: int, bk: int) -> torch.Tensor:
    """The GEMV kernel (M <= 8) launched with the given BLOCK_N and BLOCK_K."""
    import triton

    from quant import triton_blocks

    m = x.shape[0]
    bm = 1 << (m - 1).bit_length()
    out = torch.empty(m, n, dtype=x.dtype)
    triton_blocks.matmul_kernel[(triton.cdiv(n, bn), 1)](
        x, raw, out, m, n, k, x.stride(0), out.stride(0), triton_blocks.row_bytes(qtype, k),
        QTYPE=int(qtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, num_warps=4,
    )  # fmt: skip
    return out


def check_gemv_partial_tiles(qtype: Q, seed: int) -> None:
    """GEMV steps of several blocks where K is not a multiple of the step (3 blocks of 256 in steps of 2, 11 of 32 in
    steps of 4, 100 floats in steps of 64) and a partial last tile of rows, for 1, 2 and 3 rows of x (the
    accumulators of BLOCK_M 1, 2 and 4)."""
    gen = torch.Generator().manual_seed(seed)
    qk = gguf.GGML_QUANT_SIZES[qtype][0]
    n, k, bk = (20, 768, 512) if qk == 256 else (20, 352, 128) if qk == 32 else (20, 100, 64)
    raw = random_raw(qtype, n, k, gen)
    w = dequantize(raw, qtype, (n, k))
    for m in (1, 2, 3):
        x = torch.randn(m, k, generator=gen)
        assert_close(gemv_with_tiles(x, raw, qtype, n, k, 8, bk), x.double() @ w.T, f"M={m}")


# bytes of each block holding 4-bit fields, low nibble of byte i and high nibble of byte i being different columns
# (Q2_K, Q3_K: 2-bit fields, the swap exchanging those at shifts 0, 2 with those at 4, 6)
NIBBLE_BYTES = {
    Q.Q4_0: (2, 18), Q.Q4_1: (4, 20), Q.Q5_0: (6, 22), Q.Q5_1: (8, 24), Q.Q2_K: (16, 80), Q.Q3_K: (32, 96),
    Q.Q4_K: (16, 144), Q.Q5_K: (48, 176), Q.Q6_K: (0, 128), Q.IQ4_NL: (2, 18), Q.IQ4_XS: (8, 136),
}  # fmt: skip


def check_swapped_nibbles_fail(qtype: Q, seed: int) -> None:
    """The comparison catches a kernel that mixes up low and high nibbles: the kernel on blocks whose nibbles are
    swapped (what such a kernel would compute on the real blocks) is far from the real blocks' reference."""
    from quant import triton_blocks

    gen = torch.Generator().manual_seed(seed)
    n, k = 48, 512
    raw = random_raw(qtype, n, k, gen)
    w = dequantize(raw, qtype, (n, k))
    ts = gguf.GGML_QUANT_SIZES[qtype][1]
    a, b = NIBBLE_BYTES[qtype]
    swapped = raw.clone().reshape(-1, ts)
    swapped[:, a:b] = (swapped[:, a:b] >> 4) | (swapped[:, a:b] << 4)
    x = torch.randn(1, k, generator=gen)
    y = triton_blocks.matmul(x, swapped.reshape(-1), qtype, n, k, interpreter_tiles=False)
    with pytest.raises(AssertionError):
        assert_close(y, x.double() @ w.T, "swapped nibbles")


@pytest.mark.parametrize("qtype", SUPPORTED_QTYPES, ids=lambda t: t.name)
def test_matmul_matches_dequantized_reference(qtype: Q, interpreter, seed) -> None:
    run(interpreter, check_matmul, qtype, seed)


def test_matmul_k_not_a_multiple_of_the_tile(interpreter, seed) -> None:
    run(interpreter, check_matmul_partial_k_tile, seed)


@pytest.mark.parametrize("qtype", SUPPORTED_QTYPES, ids=lambda t: t.name)
def test_gemv_partial_steps_and_row_tiles(qtype: Q, interpreter, seed) -> None:
    run(interpreter, check_gemv_partial_tiles, qtype, seed)


@pytest.mark.parametrize("qtype", list(NIBBLE_BYTES), ids=lambda t: t.name)
def test_swapped_nibbles_are_caught(qtype: Q, interpreter, seed) -> None:
    run(interpreter, check_swapped_nibbles_fail, qtype, seed)


# ---------------------------------------------------------------------------------------------------------------
# grouped MoE


def mats(spec: ExpertSpec) -> list[tuple[int, Q, tuple[int, int]]]:
    h, i = spec.hidden, spec.inter
    return [
        (spec.gate_offset, spec.gate_type, (i, h)),
        (spec.up_offset, spec.up_type, (i, h)),
        (spec.down_offset, spec.down_type, (h, i)),
    ]


def make_pool(spec: ExpertSpec, n_slots: int, gen: torch.Generator) -> torch.Tensor:
    """n_slots random experts laid out per spec in rows 48 bytes wider than needed; gaps and padding random bytes."""
    pool = torch.randint(0, 256, (n_slots, spec.nbytes + 48), dtype=torch.uint8, generator=gen)
    for s in range(n_slots):
        for off, qtype, (n, k) in mats(spec):
            raw = random_raw(qtype, n, k, gen)
            pool[s, off : off + raw.numel()] = raw
    return pool


def moe_reference(x, pool, slots, weights, spec: ExpertSpec) -> torch.Tensor:
    """Each expert dequantized, SwiGLU, weighted, the k terms summed in column order; float64."""
    experts = {
        s: [dequantize(pool[s, o : o + formats.nbytes(sh, q)], q, sh) for o, q, sh in mats(spec)]
        for s in slots.unique().tolist()
    }
    out = torch.zeros(x.shape[0], spec.hidden, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for j in range(slots.shape[1]):
            gate, up, down = experts[int(slots[t, j])]
            out[t] = out[t] + weights[t, j] * (down @ (F.silu(gate @ xt) * (up @ xt)))
    return out


def moe_inputs(types: tuple[Q, Q, Q], hidden: int, inter: int, t: int, k: int, dtype, slot_dtype, gen):
    """9 pool rows, experts drawn from rows 1..7 (rows 0 and 8 hold experts never used), distinct per token,
    each token's columns in ascending row order."""
    gate, up, down = types
    spec = ExpertSpec.packed(gate, up, down, hidden, inter)
    pool = make_pool(spec, 9, gen)
    x = torch.randn(t, hidden, generator=gen).to(dtype)
    slots = torch.stack([1 + torch.randperm(7, generator=gen)[:k] for _ in range(t)]).sort(dim=1).values
    weights = torch.rand(t, k, generator=gen)
    return spec, pool, x, slots.to(slot_dtype), weights


MOE_CASES = [
    # (gate, up, down), hidden, inter, T, k, x dtype, slots dtype
    ((Q.Q4_K, Q.Q4_K, Q.Q6_K), 256, 256, 1, 6, torch.float32, torch.int32),
    ((Q.Q4_K, Q.Q4_K, Q.Q6_K), 256, 256, 37, 4, torch.bfloat16, torch.int64),
    ((Q.Q8_0, Q.Q8_0, Q.Q5_0), 128, 96, 1, 2, torch.bfloat16, torch.int64),
    ((Q.Q8_0, Q.Q8_0, Q.Q5_0), 128, 96, 37, 3, torch.float32, torch.int32),
    ((Q.F32, Q.F32, Q.F32), 64, 48, 1, 5, torch.bfloat16, torch.int32),
    ((Q.F32, Q.F32, Q.F32), 64, 48, 37, 2, torch.float32, torch.int64),
    ((Q.Q5_K, Q.Q4_K, Q.Q8_0), 256, 160, 37, 6, torch.float16, torch.int32),
    ((Q.Q4_1, Q.BF16, Q.F16), 64, 32, 5, 3, torch.float32, torch.int64),
    ((Q.Q2_K, Q.Q3_K, Q.IQ4_XS), 256, 256, 1, 3, torch.float32, torch.int32),
    ((Q.IQ4_XS, Q.IQ4_NL, Q.Q2_K), 256, 256, 37, 3, torch.bfloat16, torch.int64),
    ((Q.Q5_1, Q.IQ4_NL, Q.Q3_K), 256, 256, 5, 2, torch.float16, torch.int32),
]


def check_moe(case: tuple, seed: int, interpreter_tiles: bool | None = None) -> None:
    from quant import triton_moe

    types, hidden, inter, t, k, dtype, slot_dtype = case
    spec, pool, x, slots, weights = moe_inputs(
        types, hidden, inter, t, k, dtype, slot_dtype, torch.Generator().manual_seed(seed)
    )

    def run_moe() -> torch.Tensor:
        if interpreter_tiles is None:
            return moe_ffn(x, pool, slots, weights, spec)
        return triton_moe.moe(x, pool, slots, weights, spec, interpreter_tiles=interpreter_tiles)

    y = run_moe()
    assert y.dtype == dtype and y.shape == (t, hidden)
    assert_close(y, moe_reference(x, pool, slots, weights, spec), "moe_ffn")
    if t == 1 and interpreter_tiles is None:
        assert torch.equal(run_moe(), y)  # deterministic (the same tiles: the same order of every float sum)


@pytest.mark.parametrize(
    "case", MOE_CASES, ids=[f"{'-'.join(q.name for q in c[0])}-T{c[3]}-k{c[4]}" for c in MOE_CASES]
)
def test_moe_ffn_matches_reference(case: tuple, interpreter, seed) -> None:
    run(interpreter, check_moe, case, seed)


@pytest.mark.parametrize("t, k", [(1, 3), (37, 3)])
def test_moe_with_gpu_tiles(t: int, k: int, interpreter, seed) -> None:
    """The GPU's tile sizes: GEMV per pair at T=1 (one program per pair and row or few rows of each matrix: slow
    in the interpreter, so 3 pairs); tl.dot with BLOCK_M 16..64 and BLOCK_K 32 at T=37."""
    case = ((Q.Q8_0, Q.Q4_0, Q.Q5_0), 128, 96, t, k, torch.float32, torch.int64)
    run(interpreter, check_moe, case, seed, False)


def check_align(block_m: int, seed: int) -> None:
    from quant import triton_moe

    gen = torch.Generator().manual_seed(seed)
    n_slots, t, k = 10, 23, 4
    slots = torch.stack([torch.randperm(n_slots - 2, generator=gen)[:k] for _ in range(t)]).reshape(-1)
    sorted_ids, block_slot, total = triton_moe.align_by_slot(slots, n_slots, block_m)
    p = t * k
    assert sorted_ids.numel() == block_slot.numel() * block_m >= p + min(p, n_slots) * (block_m - 1)
    assert sorted(sorted_ids[sorted_ids < p].tolist()) == list(range(p))  # every pair exactly once
    assert int(total) % block_m == 0 and bool((sorted_ids[int(total) :] == p).all())
    for b in range(int(total) // block_m):
        ids = sorted_ids[b * block_m : (b + 1) * block_m]
        ids = ids[ids < p].long()
        assert ids.numel() > 0 and bool((slots[ids] == block_slot[b]).all())
        assert bool((ids.diff() > 0).all())  # stable: a slot's pairs in token order


@pytest.mark.parametrize("block_m", [1, 16])
def test_align_by_slot_groups_pairs(block_m: int, interpreter, seed) -> None:
    run(interpreter, check_align, block_m, seed)


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation for an H100 (in the compiling worker)


def _aot(fn, constexprs: dict, pointers: dict[str, str], num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget

    names = fn.arg_names
    signature = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in pointers}  # as a launch on aligned buffers
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def probe_sm90() -> str | None:
    """None if triton can compile a trivial kernel for sm_90 here, else why not."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(p, BLOCK: tl.constexpr):
        tl.store(p + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))

    try:
        _aot(probe, {"BLOCK": 32}, {"p": "*fp32"}, 4)
    except Exception as e:  # no nvidia backend or toolchain in this triton build
        return f"{type(e).__name__}: {e}"
    return None


def compile_all_for_sm90() -> list[str]:
    from quant import triton_blocks, triton_moe

    built = []

    def check(what: str, kernel) -> None:
        assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm.get("cubin"), what  # PTX, and ptxas ran
        built.append(what)

    for q in SUPPORTED_QTYPES:
        configs = [
            (triton_blocks.gemv_config(q, 1, 2048, 2048), False, "*fp32"),
            (triton_blocks.gemv_config(q, 2, 102400, 2048), False, "*bf16"),
            (triton_blocks.gemv_config(q, 8, 2048, 2048), False, "*fp16"),
            (triton_blocks.gemm_config(q, 64), True, "*bf16"),
        ]
        for (bm, bn, bk, warps), dot, xt in configs:
            const = {"QTYPE": int(q), "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "USE_DOT": dot}
            ptrs = {"w_ptr": "*u8", "x_ptr": xt, "out_ptr": xt}
            check(f"matmul {q.name} {bm}x{bn}x{bk}", _aot(triton_blocks.matmul_kernel, const, ptrs, warps))
    moe_ptrs = {
        "x_ptr": "*bf16", "pool_ptr": "*u8", "h_ptr": "*fp32", "o_ptr": "*fp32", "weights_ptr": "*fp32",
        "sorted_ids_ptr": "*i32", "block_slot_ptr": "*i64", "total_ptr": "*i64",
    }  # fmt: skip
    for gate, up, down in [(q, q, q) for q in SUPPORTED_QTYPES] + [(Q.Q4_K, Q.Q8_0, Q.Q6_K)]:
        for block_m, dot in ((1, False), (64, True)):
            kernel = triton_moe.moe_gate_up_kernel
            bn, bk = triton_moe.tiles(dot, False, (gate, up), 1408, 2048, 6)
            const = {"GATE_TYPE": int(gate), "UP_TYPE": int(up), "BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk}
            ptrs = {a: moe_ptrs[a] for a in kernel.arg_names if a in moe_ptrs}
            check(f"moe gate/up {gate.name}/{up.name} M{block_m}", _aot(kernel, {**const, "USE_DOT": dot}, ptrs, 4))
            kernel = triton_moe.moe_down_kernel
            bn, bk = triton_moe.tiles(dot, False, (down,), 2048, 1408 if down in (Q.Q8_0, Q.Q5_0) else 2048, 6)
            const = {"DOWN_TYPE": int(down), "BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk, "USE_DOT": dot}
            ptrs = {a: moe_ptrs[a] for a in kernel.arg_names if a in moe_ptrs}
            check(f"moe down {down.name} M{block_m}", _aot(kernel, const, ptrs, 4))
    return built


def test_every_kernel_variant_compiles_for_sm90(compiler) -> None:
    reason = compiler.submit(probe_sm90).result()
    if reason is not None:
        pytest.skip(f"triton cannot compile for sm_90 without a GPU here: {reason}")
    built = compiler.submit(compile_all_for_sm90).result()
    assert len(built) == 4 * len(SUPPORTED_QTYPES) + 2 * 2 * (len(SUPPORTED_QTYPES) + 1)


# ---------------------------------------------------------------------------------------------------------------
# on a real GPU (in the compiling worker)


def check_on_cuda(seed: int) -> None:
    """Every type and MoE case on the GPU against the references, MoE with host syncs turned into errors."""
    gen = torch.Generator().manual_seed(seed)
    for q in SUPPORTED_QTYPES:
        n, k = 48, 512
        raw = random_raw(q, n, k, gen)
        w = dequantize(raw, q, (n, k))
        for m in (1, 5, 64):
            x = torch.randn(m, k, generator=gen)
            y = gguf_matmul(x.cuda(), raw.cuda(), q, n, k).cpu()
            assert_close(y, x.double() @ w.T, f"{q.name} M={m} on CUDA")
    for types, hidden, inter, t, k, dtype, slot_dtype in MOE_CASES:
        spec, pool, x, slots, weights = moe_inputs(types, hidden, inter, t, k, dtype, slot_dtype, gen)
        xd, pd, sd, wd = (a.cuda() for a in (x, pool, slots, weights))
        moe_ffn(xd, pd, sd, wd, spec)  # compiles outside the no-sync region
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = moe_ffn(xd, pd, sd, wd, spec)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert_close(y.cpu(), moe_reference(x, pool, slots, weights, spec), f"moe {types} T={t} on CUDA")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_without_host_syncs(compiler, seed) -> None:
    run(compiler, check_on_cuda, seed)
