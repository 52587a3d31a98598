"""`lite convert` from a GGUF (F32/F16/BF16/Q8_0) to any recipe, recipes end to end, progress output, --force and
--allow-nonfinite; and llama.cpp's own quantizer on the same bf16 GGUF, where llama-cpp-python is installed."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lite.convert.writer as convert_mod
from lite.convert import convert
from lite.convert.recipes import choose
from lite.errors import LiteError
from quant.formats import dequantize, quantize
from quant.gguf_file import GGUFFile

Q = gguf.GGMLQuantizationType
LLAMA_FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q8_0": 7}  # llama_ftype values


@pytest.fixture(scope="module")
def bf16_gguf(hf_lite, tmp_path_factory) -> Path:
    """The tiny V2-Lite-like checkpoint as a bf16 GGUF (what llama.cpp's convert_hf_to_gguf.py --outtype bf16 gives)."""
    out = tmp_path_factory.mktemp("gguf_in") / "m-bf16.gguf"
    convert(hf_lite, out, outtype="bf16")
    return out


def requantized(src: GGUFFile, dst: GGUFFile) -> None:
    """Every tensor of dst is src's, quantized from its decoded values to dst's type (or copied when unchanged)."""
    assert list(dst.tensors) == list(src.tensors)
    for name, t in dst.tensors.items():
        s = src.tensors[name]
        assert t.shape == s.shape, name
        if t.qtype == s.qtype:
            assert np.array_equal(t.data, s.data), name
        else:
            x = dequantize(s.data, s.qtype, s.shape)
            assert np.array_equal(t.data, quantize(x, t.qtype).reshape(-1)), name


@pytest.mark.parametrize("recipe", ["q4_k_m", "q5_k_m", "q6_k", "q8_0", "lite"])
def test_bf16_gguf_to_every_recipe(bf16_gguf, tmp_path, recipe):
    out = tmp_path / f"{recipe}.gguf"
    s = convert(bf16_gguf, out, recipe=recipe)
    src, dst = GGUFFile(bf16_gguf), GGUFFile(out)
    requantized(src, dst)
    meta = src.metadata
    shapes = [(n, t.shape) for n, t in src.tensors.items()]
    want = choose(recipe, shapes, meta["deepseek2.block_count"], meta["deepseek2.expert_count"],
                  keep=[t.qtype for t in src.tensors.values()])  # fmt: skip
    assert [t.qtype for t in dst.tensors.values()] == [c.qtype for c in want]
    for key, value in meta.items():  # metadata copied, file type set anew
        if key != "general.file_type":
            assert dst.metadata[key] == value, key
    assert dst.metadata["general.file_type"] == int(s.file_type) and s.input_kind == "gguf"
    assert s.output_bytes == out.stat().st_size == convert(bf16_gguf, out, recipe=recipe, dry_run=True).output_bytes


def test_gguf_and_hf_give_the_same_file(hf_lite, bf16_gguf, tmp_path):
    """HF → bf16 GGUF → q4_k_m has the tensors of HF (rounded to bf16) → q4_k_m: the two inputs are one model."""
    convert(bf16_gguf, tmp_path / "via_gguf.gguf", recipe="q4_k_m")
    a = GGUFFile(tmp_path / "via_gguf.gguf")
    types = {n: t.qtype for n, t in a.tensors.items()}
    convert(hf_lite, tmp_path / "direct.gguf", recipe="q4_k_m")
    b = GGUFFile(tmp_path / "direct.gguf")
    assert types == {n: t.qtype for n, t in b.tensors.items()}
    assert types["blk.1.attn_output.weight"] == Q.Q5_1  # 8 experts: Q5_K (llama.cpp), rows of 128: Q5_1
    assert types["output.weight"] == Q.Q6_K and types["blk.2.ffn_down_exps.weight"] == Q.Q8_0  # 3 layers: 2 gets more
    assert types["blk.1.ffn_down_exps.weight"] == Q.Q5_0


def test_q8_0_gguf_requantized_and_copied(hf_lite, tmp_path):
    convert(hf_lite, tmp_path / "q8.gguf", outtype="q8_0")
    convert(tmp_path / "q8.gguf", tmp_path / "q4km.gguf", recipe="q4_k_m")
    requantized(GGUFFile(tmp_path / "q8.gguf"), GGUFFile(tmp_path / "q4km.gguf"))
    convert(tmp_path / "q8.gguf", tmp_path / "same.gguf", recipe="q8_0")  # every tensor copied as it is
    requantized(GGUFFile(tmp_path / "q8.gguf"), GGUFFile(tmp_path / "same.gguf"))


def test_quantized_gguf_input_is_refused_unless_copied(hf_lite, tmp_path):
    convert(hf_lite, tmp_path / "lite.gguf")  # Q4_K / Q4_0 / Q8_0
    with pytest.raises(LiteError, match=r"tensor blk\.1\.ffn_\w+_exps\.weight is Q4_[K0]; lite requantizes GGUFs"):
        convert(tmp_path / "lite.gguf", tmp_path / "x.gguf", recipe="q6_k")
    assert not (tmp_path / "x.gguf").exists()
    convert(tmp_path / "lite.gguf", tmp_path / "copy.gguf")  # the same recipe: every tensor copied
    a, b = GGUFFile(tmp_path / "lite.gguf"), GGUFFile(tmp_path / "copy.gguf")
    assert a.metadata == b.metadata and all(np.array_equal(t.data, b.tensors[n].data) for n, t in a.tensors.items())


def test_gguf_input_streams_in_slices(bf16_gguf, tmp_path, monkeypatch):
    seen: list[tuple[int, ...]] = []
    real = convert_mod.quantize

    def spy(x, qtype):
        seen.append(tuple(x.shape))
        return real(x, qtype)

    convert(bf16_gguf, tmp_path / "whole.gguf", recipe="q4_k_m")
    monkeypatch.setattr(convert_mod, "quantize", spy)
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 100 * 256)
    convert(bf16_gguf, tmp_path / "sliced.gguf", recipe="q4_k_m")
    assert max(int(np.prod(s)) for s in seen) <= 100 * 256 and (512 - 100 * 5, 256) in seen
    assert (tmp_path / "whole.gguf").read_bytes() == (tmp_path / "sliced.gguf").read_bytes()


def test_dry_run_lists_every_tensor(bf16_gguf, tmp_path, lite):
    r = lite("convert", str(bf16_gguf), "-o", str(tmp_path / "x.gguf"), "--recipe", "q4_k_m", "--dry-run")
    assert "blk.1.ffn_down_exps.weight" in r.stdout and "Q6_K" in r.stdout and "estimated output" in r.stdout
    assert not (tmp_path / "x.gguf").exists()


def test_plain_progress_lines_off_a_terminal(bf16_gguf, tmp_path, lite, monkeypatch):
    import cli.cmd_convert

    monkeypatch.setattr(cli.cmd_convert, "PLAIN_EVERY_S", 0.0)
    r = lite("convert", str(bf16_gguf), "-o", str(tmp_path / "p.gguf"), "--recipe", "q4_k_m")
    lines = r.stdout.splitlines()
    ticks = [ln for ln in lines if ln.startswith("[") and " tensors] " in ln]
    assert ticks and "MB/s ETA" in ticks[-1] and ticks[-1].startswith("[44/44 tensors] 100.0%")
    assert lines[-1].startswith("done in ") and "bits/weight, peak RSS" in lines[-1]


def _put_nan(path: Path, name: str, out: Path) -> None:
    """A copy of the GGUF at `path` with one NaN in tensor `name` (F32 or BF16)."""
    shutil.copy(path, out)
    t = GGUFFile(out).tensors[name]
    nan = np.array([np.nan], np.float32).view(np.uint8) if t.qtype == Q.F32 else np.array([0x7FC0], "<u2").view("u1")
    with open(out, "r+b") as f:
        f.seek(t.offset + 3 * nan.size)
        f.write(nan.tobytes())


def test_nan_in_a_gguf_is_named_or_allowed(bf16_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    _put_nan(bf16_gguf, "blk.2.ffn_up_exps.weight", bad)
    with pytest.raises(LiteError, match=r"weight blk\.2\.ffn_up_exps\.weight contains NaN or Inf.*--allow-nonfinite"):
        convert(bad, tmp_path / "out.gguf", recipe="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
    s = convert(bad, tmp_path / "out.gguf", outtype="f32", allow_nonfinite=True)
    assert s.nonfinite == ["blk.2.ffn_up_exps.weight"] and "hold NaN or Inf" in s.notes[-1]
    t = GGUFFile(tmp_path / "out.gguf").tensors["blk.2.ffn_up_exps.weight"]
    assert int(torch.isnan(dequantize(t.data, t.qtype, t.shape)).sum()) == 1


def test_force_keeps_the_old_file_when_conversion_fails(bf16_gguf, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    calls = []

    def fail_later(fout, raw):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        fout.write(memoryview(np.ascontiguousarray(raw).reshape(-1).view(np.uint8)))

    monkeypatch.setattr(convert_mod, "_write_chunk", fail_later)
    with pytest.raises(KeyboardInterrupt):
        convert(bf16_gguf, out, recipe="q4_k_m", force=True)
    assert out.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# --- llama.cpp's own quantizer (needs `pip install llama-cpp-python`; skipped without it) ----------------------


_SILENCE: list = []  # keeps the no-op log callback alive


def _llama_quantize(src: Path, dst: Path, recipe: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if not _SILENCE:  # llama.cpp's quantizer logs every tensor through a callback that chokes on some bytes
        _SILENCE.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
        llama_cpp.llama_log_set(_SILENCE[0], ctypes.c_void_p())
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[recipe]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.mark.parametrize("legacy", [False, True], ids=["split_kv_b", "legacy_kv_b"])
@pytest.mark.parametrize("recipe", ["q4_k_m", "q5_k_m", "q6_k", "q8_0"])
def test_llama_cpp_quantize_gives_the_same_file(hf_checkpoint, tmp_path, recipe, legacy):
    """llama_model_quantize on a bf16 GGUF of each tiny checkpoint, and lite on the same file: every tensor has the
    same type and the same bytes (llama.cpp's choice per tensor, its reference quantizers, no importance matrix)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    src = tmp_path / "bf16.gguf"
    convert(hf_checkpoint, src, outtype="bf16", legacy_kv_b=legacy)
    _llama_quantize(src, tmp_path / "llama.gguf", recipe)
    convert(src, tmp_path / "lite.gguf", recipe=recipe)
    a, b = GGUFFile(tmp_path / "llama.gguf"), GGUFFile(tmp_path / "lite.gguf")
    assert sorted(a.tensors) == sorted(b.tensors)  # llama.cpp writes them sorted by layer and name
    for name, t in a.tensors.items():
        assert (b.tensors[name].qtype, b.tensors[name].shape) == (t.qtype, t.shape), name
        assert np.array_equal(b.tensors[name].data, t.data), name
    if legacy and b.metadata["deepseek2.expert_count"] == 8:  # attn_kv_b is attn_v-like: 8 experts bump it
        assert a.tensors["blk.1.attn_kv_b.weight"].qtype == Q.Q8_0
    head = b.tensors["output.weight"]
    assert head.qtype == (Q.Q8_0 if recipe == "q8_0" else Q.Q6_K)
    assert torch.isfinite(dequantize(head.data, head.qtype, head.shape)).all()


def test_a_gguf_made_by_llama_cpp_is_requantized(hf_lite, tmp_path):
    """llama.cpp's own Q8_0 file (its tensor order, its metadata) converts to any recipe: the same types as from
    the bf16 file, each tensor quantized from llama.cpp's Q8_0 values."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    convert(hf_lite, tmp_path / "bf16.gguf", outtype="bf16")
    _llama_quantize(tmp_path / "bf16.gguf", tmp_path / "llama-q8_0.gguf", "q8_0")
    convert(tmp_path / "llama-q8_0.gguf", tmp_path / "q4km.gguf", recipe="q4_k_m")
    convert(tmp_path / "bf16.gguf", tmp_path / "direct.gguf", recipe="q4_k_m")
    src, out = GGUFFile(tmp_path / "llama-q8_0.gguf"), GGUFFile(tmp_path / "q4km.gguf")
    requantized(src, out)
    direct = GGUFFile(tmp_path / "direct.gguf")
    assert {n: t.qtype for n, t in out.tensors.items()} == {n: t.qtype for n, t in direct.tensors.items()}


def test_llama_recipes_load_and_agree_with_f32(hf_lite, tmp_path):
    """Files of llama.cpp's recipes (Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, Q8_0 tensors) load in lite and stay close to the
    exact f32 file; more bits, closer. Measured mean KL: q4_k_m 0.047, q5_k_m 0.018, q8_0 5.8e-4 (lite's default
    1.3e-3, and q4_k_m with --rest q8_0 1.1e-3: on this tiny random model the 4/5-bit attention costs the most)."""
    import lite

    tokens = torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    logp = {}
    for recipe in ("f32", "q4_k_m", "q5_k_m", "q8_0"):
        options = dict(outtype="f32") if recipe == "f32" else dict(recipe=recipe)
        convert(hf_lite, tmp_path / f"{recipe}.gguf", **options)
        logp[recipe] = torch.log_softmax(lite.load(str(tmp_path / f"{recipe}.gguf"), device="cpu").logits(tokens), -1)
    kl = {r: float((logp["f32"].exp() * (logp["f32"] - logp[r])).sum(-1).mean()) for r in ("q4_k_m", "q5_k_m", "q8_0")}
    assert kl["q4_k_m"] < 0.1 and kl["q8_0"] < kl["q5_k_m"] < kl["q4_k_m"], kl
    assert "Q5_1" in {t.qtype.name for t in GGUFFile(tmp_path / "q5_k_m.gguf").tensors.values()}
