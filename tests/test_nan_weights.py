"""NaN or Inf in a weight: one line naming the tensor at load (small tensors in full, large ones sampled), and
never silent garbage afterwards (non-finite logits are refused)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from cli_models import tiny_chat_model

import quant.finite
from lite.errors import LiteError
from lite.loader import load as load_model
from quant.finite import SCALES, check_finite, nonfinite
from quant.formats import READ_TYPES, WRITE_TYPES, dequantize, quantize
from quant.gguf_file import GGUFFile

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", READ_TYPES, ids=lambda q: q.name)
def test_nonfinite_agrees_with_dequantize(qtype):
    """The scale-bit test flags exactly the blocks (or values) whose dequantized values are not finite."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((6, 512)).astype(np.float32)
    raw = quantize(rows, qtype) if qtype in WRITE_TYPES else None
    if raw is None:  # types lite reads but does not write: random bytes are valid blocks (finite fp16 scales)
        raw = rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape((6, 512), qtype), dtype=np.uint8)
        offset, count = SCALES[qtype]
        scales = raw.reshape(6, -1, gguf.GGML_QUANT_SIZES[qtype][1])[:, :, offset : offset + 2 * count]
        scales[...] = np.tile(np.array([0.01], np.float16).view(np.uint8), count)
    raw = np.ascontiguousarray(raw).reshape(6, -1)
    poison = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: None}
    values = [np.nan, np.inf, -np.inf]
    for r, v in zip((1, 3, 4), values):
        if qtype in SCALES:  # one scale of one block
            offset, count = SCALES[qtype]
            block = gguf.GGML_QUANT_SIZES[qtype][1]
            at = block + offset + 2 * (r % count)  # the second block of the row
            raw[r, at : at + 2] = np.array([v], np.float16).view(np.uint8)
        elif poison[qtype] is not None:
            raw[r].view(poison[qtype])[r * 7] = v
        else:  # bf16: the top half of the float32
            raw[r].view(np.uint16)[r * 7] = np.array([v], np.float32).view(np.uint32)[0] >> 16
    deq = dequantize(raw.reshape(-1), qtype, (6, 512))
    bad_values = ~torch.isfinite(deq)
    flagged = nonfinite(raw, qtype)
    per = 512 // flagged.shape[1]  # values per flag (1 for float types, the block size otherwise)
    assert torch.equal(torch.from_numpy(flagged), bad_values.reshape(6, -1, per).any(-1))
    assert flagged.sum() == 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("nan_models"))[0]  # an f32 GGUF


def poisoned(src: Path, dst: Path, tensor: str, index: int, value: float = float("nan")) -> Path:
    shutil.copy(src, dst)
    t = GGUFFile(src).tensors[tensor]
    assert t.qtype == Q.F32
    with open(dst, "r+b") as f:
        f.seek(t.offset + 4 * index)
        f.write(np.float32(value).tobytes())
    return dst


def test_nan_in_a_norm_is_named_at_load(tiny, tmp_path, lite):
    bad = poisoned(tiny, tmp_path / "bad.gguf", "blk.1.attn_norm.weight", 3)
    with pytest.raises(LiteError) as e:
        load_model(str(bad), device="cpu")
    assert str(e.value) == (
        f"{bad}: tensor blk.1.attn_norm.weight holds NaN or Inf (value 3); the file is corrupt: download or convert "
        "it again"
    )
    r = lite("run", str(bad), "-p", "hi", check=False)
    assert (r.returncode, r.stderr) == (2, f"error: {e.value}\n")


def test_inf_in_a_sampled_row_is_named(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(quant.finite, "FULL_CHECK_ELEMENTS", 0)  # every 2-D tensor counts as large
    n_rows = GGUFFile(tiny).tensors["output.weight"].shape[0]
    picked = quant.finite.sample_rows(n_rows, 10**9, False)
    row = int(picked[3])
    width = GGUFFile(tiny).tensors["output.weight"].shape[1]
    bad = poisoned(tiny, tmp_path / "bad.gguf", "output.weight", row * width + 5, float("inf"))
    with pytest.raises(LiteError, match=rf"tensor output\.weight holds NaN or Inf \(row {row}\)"):
        check_finite(GGUFFile(bad).tensors, str(bad))


def test_nan_that_sampling_misses_is_refused_at_the_logits(tiny, tmp_path, monkeypatch, lite):
    """A NaN in an unsampled row of the output matrix loads, but generation and perplexity refuse it instead
    of answering token 0 or a perplexity equal to the vocabulary size."""
    monkeypatch.setattr(quant.finite, "FULL_CHECK_ELEMENTS", 0)
    ref = GGUFFile(tiny).tensors["output.weight"]
    picked = set(quant.finite.sample_rows(ref.shape[0], 10**9, False).tolist())
    row = next(r for r in range(1, ref.shape[0]) if r not in picked)
    bad = poisoned(tiny, tmp_path / "bad.gguf", "output.weight", row * ref.shape[1])
    model = load_model(str(bad), device="cpu")  # sampling does not see it
    prompt = model.tokenizer.encode("Once upon", add_bos=True)
    with pytest.raises(LiteError, match=r"^the model produced NaN or Inf logits at position \d+: a weight holds NaN"):
        list(model.generate(prompt, max_tokens=3, temperature=0.0))
    r = lite("run", str(bad), "-p", "Once upon", "-n", "3", "--temp", "0", "--json", check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: the model produced NaN or Inf logits")
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a model. " * 40)
    r = lite("perplexity", str(bad), str(text), "--ctx", "32", "--json", check=False)
    assert r.returncode == 2 and "NaN or Inf logits" in r.stderr and r.stdout == ""
    assert json.loads(lite("run", str(tiny), "-p", "Once upon", "-n", "3", "--temp", "0", "--json").stdout)["tokens"]
