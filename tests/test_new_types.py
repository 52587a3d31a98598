"""Whole-model checks of the block types added for community GGUFs (Q5_1, Q5_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS) and of
the dequantize-once fallback for types lite has no kernels for (IQ2_XXS, MXFP4, ...).

Each file is the tiny V2-Lite-like model with its routed experts replaced by random valid blocks of those types
(scales set so the weights have the original's magnitude); the reference is the same file with those tensors
written as their gguf-py-dequantized F32 values."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from retype_gguf import rewrite

import lite
from quant import native
from quant.gguf_file import TensorRef

Q = gguf.GGMLQuantizationType
PROMPT = [0, 5, 17, 300, 42, 7, 99, 100, 101, 3, 250, 11]

# byte offsets of the fp16 scale fields in one block
F16_FIELDS = {
    Q.Q5_1: [0, 2], Q.IQ4_NL: [0], Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q5_K: [0, 2], Q.IQ4_XS: [0], Q.IQ2_XXS: [0],
}  # fmt: skip
# layer 1 and 2's routed experts: every new type once, gate and up of different types (K = hidden = 256; down has
# K = 64, so only 32-value types fit it)
NEW = {
    "blk.1.ffn_gate_exps.weight": Q.Q2_K, "blk.1.ffn_up_exps.weight": Q.Q3_K, "blk.1.ffn_down_exps.weight": Q.IQ4_NL,
    "blk.2.ffn_gate_exps.weight": Q.IQ4_XS, "blk.2.ffn_up_exps.weight": Q.Q5_K, "blk.2.ffn_down_exps.weight": Q.Q5_1,
}  # fmt: skip
# types gguf-py reads and lite does not multiply: dequantized once at load
OTHER = {
    "blk.1.ffn_gate_exps.weight": Q.IQ2_XXS, "blk.1.ffn_up_exps.weight": Q.IQ2_XXS,
    "blk.2.ffn_down_exps.weight": Q.MXFP4,
}  # fmt: skip


def random_blocks(ref: TensorRef, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks for `ref`'s shape whose values have about the original tensor's standard deviation."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ref.n_elements // bs, ts), dtype=np.uint8)
    target = float(np.asarray(gguf.quants.dequantize(np.array(ref.data), ref.qtype)).std())
    if qtype == Q.MXFP4:  # an e8m0 exponent byte: 2^(e - 127) times e2m1 values up to 6
        raw[:, 0] = rng.integers(118, 122, size=raw.shape[0])
        return raw.reshape(-1)
    for off in F16_FIELDS[qtype]:
        raw[:, off : off + 2] = np.array([1.0], np.float16).view(np.uint8)
    unit = float(gguf.quants.dequantize(raw[:512], qtype).std())  # values scale linearly with the fp16 fields
    for off in F16_FIELDS[qtype]:
        d = (rng.uniform(0.5, 1.5, size=(raw.shape[0], 1)) * target / unit).astype(np.float16)
        raw[:, off : off + 2] = d.view(np.uint8)
    return raw.reshape(-1)


def pair(src: Path, out_dir: Path, types: dict[str, Q]) -> tuple[Path, Path]:
    """(the file with `types`' tensors as random blocks, the same file with them as dequantized F32)."""
    rng = np.random.default_rng(7)
    blocks = {n: random_blocks(ref, types[n], rng) for n, ref in lite_tensors(src).items() if n in types}

    def typed(ref: TensorRef) -> tuple[Q, np.ndarray] | None:
        return (types[ref.name], blocks[ref.name]) if ref.name in blocks else None

    def f32(ref: TensorRef) -> tuple[Q, np.ndarray] | None:
        if ref.name not in blocks:
            return None
        x = gguf.quants.dequantize(blocks[ref.name].reshape(-1, gguf.GGML_QUANT_SIZES[types[ref.name]][1]),
                                   types[ref.name])  # fmt: skip
        return Q.F32, np.ascontiguousarray(x, np.float32).reshape(-1).view(np.uint8)

    return rewrite(src, out_dir / "typed.gguf", typed), rewrite(src, out_dir / "f32.gguf", f32)


def lite_tensors(path: Path) -> dict[str, TensorRef]:
    from quant.gguf_file import GGUFFile

    return GGUFFile(path).tensors


@pytest.fixture(scope="module")
def tiny_gguf(tiny_q4_gguf) -> Path:
    return tiny_q4_gguf


@pytest.fixture(scope="module")
def new_pair(tiny_gguf, tmp_path_factory) -> tuple[Path, Path]:
    return pair(tiny_gguf, tmp_path_factory.mktemp("new"), NEW)


def disk_ram(model, slots: int, lru: int, ctx: int = 32) -> int:
    """`ram_memory` for a CPU disk tier of `slots` slots per layer and a RAM LRU of `lru` experts."""
    a, specs = model.config, model.experts.specs
    latent = a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * 4 * ctx
    return latent + slots * sum(s.nbytes for s in specs.values()) + lru * max(s.nbytes for s in specs.values())


def tier_logits(path: Path) -> list[torch.Tensor]:
    """Prefill logits with the experts resident, behind a 1-slot RAM cache, and read from disk (2 slots)."""
    full = lite.load(str(path), device="cpu", experts_on="device")
    out = [full.logits(PROMPT)]
    out.append(lite.load(str(path), device="cpu", experts_on="ram", expert_cache=1).logits(PROMPT))
    disk = lite.load(
        str(path), device="cpu", experts_on="disk", expert_cache=2, ctx=32, ram_memory=disk_ram(full, 2, 5)
    )
    out.append(disk.logits(PROMPT))
    return out


def test_files_hold_the_new_types(new_pair) -> None:
    tensors = lite_tensors(new_pair[0])
    assert {n: tensors[n].qtype for n in NEW} == NEW
    assert all(lite_tensors(new_pair[1])[n].qtype == Q.F32 for n in NEW)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: native kernels can't build")
def test_new_types_run_natively_on_every_tier(new_pair) -> None:
    """The native kernels (8-bit activations): the same logits on every tier, close to the F32 twin's."""
    assert all(t.name in native.SUPPORTED_QTYPES for t in NEW.values())
    typed = tier_logits(new_pair[0])
    for other in typed[1:]:
        assert torch.equal(other, typed[0])
    ref = lite.load(str(new_pair[1]), device="cpu", experts_on="device").logits(PROMPT)
    assert torch.isfinite(typed[0]).all()
    # 8-bit activations (in every layer's experts, whose random weights dominate this tiny model's residual) move
    # the logits by a few %; a wrong decode (a swapped field, a sign) moves them by O(1). The kernels themselves are
    # checked tightly against float64 math in test_native_kernels.py.
    assert (typed[0] - ref).norm() <= 0.08 * ref.norm(), float((typed[0] - ref).norm() / ref.norm())


def test_new_types_equal_f32_when_dequantized(new_pair, monkeypatch) -> None:
    """LITE_CPU_KERNEL=dense dequantizes the same bytes (quant/formats.py) for a float GEMM: exactly the F32 twin's
    logits, on every tier (the slot pools are sized from the new types' block bytes)."""
    monkeypatch.setenv("LITE_CPU_KERNEL", "dense")
    typed = tier_logits(new_pair[0])
    ref = lite.load(str(new_pair[1]), device="cpu", experts_on="device").logits(PROMPT)
    for t in typed:
        assert torch.equal(t, ref)


def test_other_types_are_dequantized_once_at_load(tiny_gguf, tmp_path) -> None:
    """IQ2_XXS and MXFP4 experts: one notice naming the types, and the F32 twin's logits exactly (every tier)."""
    typed, f32 = pair(tiny_gguf, tmp_path, OTHER)
    assert {lite_tensors(typed)[n].qtype for n in OTHER} == {Q.IQ2_XXS, Q.MXFP4}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lite.load(str(typed), device="cpu", experts_on="device")
    notes = [str(w.message) for w in caught if "once at load" in str(w.message)]
    assert len(notes) == 1 and "IQ2_XXS" in notes[0] and "MXFP4" in notes[0] and "slower" in notes[0], notes
    ref = lite.load(str(f32), device="cpu", experts_on="device").logits(PROMPT)
    assert torch.equal(model.logits(PROMPT), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in tier_logits(typed):
            assert torch.equal(t, ref)
