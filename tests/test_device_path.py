"""The GPU code path on any machine: with LITE_DEVICE_KERNELS=triton every weight stays GGUF blocks and every
matmul (attention, shared experts, the grouped expert kernel over slot pools) runs the Triton device kernels,
interpreted on CPU tensors. Its logits must match the CPU path's float32 arithmetic on the same file.

Triton fixes interpreted-or-compiled when it is first imported, so the device path runs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lite

pytest.importorskip("triton", reason="the device kernels are written in Triton (pip install triton)")

PROMPT = [0, 5, 17, 300, 42, 7, 99, 100, 101, 3, 250, 11]
DECODE = [8, 400, 77]
CONFIGS = {  # experts resident (the grouped kernel on one pool per layer), and a 1-slot cache on the RAM tier
    "resident": {"experts_on": "device"},
    "cached": {"experts_on": "ram", "expert_cache": 1, "miss_policy": "fetch"},
    "global": {"experts_on": "ram", "expert_cache": 3, "cache_scope": "global"},
}

SCRIPT = (
    f"PROMPT, DECODE = {PROMPT}, {DECODE}\n"
    + """
import json, sys, torch, lite
from quant.qmatrix import QMatrix
path, out, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
m = lite.load(path, device="cpu", cache_dtype=torch.float32, **opts)  # float32 math throughout
assert all(q.layout == "gguf" for q in m.transformer.weights.layers[1].shared.__dict__.values()
           if isinstance(q, QMatrix)), "the device path keeps every weight as GGUF blocks"
s = m.session(32)
pre = s.feed(PROMPT, all_logits=True)
dec = [s.feed([t]) for t in DECODE]
torch.save({"pre": pre, "dec": torch.stack(dec), "stats": m.stats().get("total", {})}, out)
"""
)


def device_path_logits(path: Path, out: Path, opts: dict) -> dict:
    env = {**os.environ, "LITE_DEVICE_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(out), json.dumps(opts)], check=True, env=env,
                   cwd=root, timeout=600)  # fmt: skip
    return torch.load(out)


def cpu_logits(path: Path, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setenv("LITE_CPU_KERNEL", "dense")  # float32 weights, float32 activations: the device kernels' math
    m = lite.load(str(path), device="cpu", experts_on="device", cache_dtype=torch.float32)
    s = m.session(32)
    return s.feed(PROMPT, all_logits=True), torch.stack([s.feed([t]) for t in DECODE])


@pytest.fixture(scope="module")
def files(tmp_path_factory, hf_lite) -> dict[str, Path]:
    """The tiny model as llama.cpp's Q4_K_M mixture (Q4_K gate/up, Q8_0 and Q5_0 down, Q8_0 attention) and f32."""
    import gguf
    from retype_gguf import retype

    from lite.convert import convert

    d = tmp_path_factory.mktemp("device_path")
    convert(hf_lite, d / "q4.gguf")
    Q = gguf.GGMLQuantizationType
    downs = {"blk.1.ffn_down_exps.weight": Q.Q8_0, "blk.2.ffn_down_exps.weight": Q.Q5_0}
    retype(d / "q4.gguf", d / "mixed.gguf", lambda ref: downs.get(ref.name))
    convert(hf_lite, d / "f32.gguf", outtype="f32")
    return {"mixed": d / "mixed.gguf", "f32": d / "f32.gguf"}


@pytest.mark.parametrize("name", ["mixed", "f32"])
def test_device_path_matches_cpu_path(files, name, tmp_path, monkeypatch):
    pre, dec = cpu_logits(files[name], monkeypatch)
    for label, opts in CONFIGS.items():
        got = device_path_logits(files[name], tmp_path / f"{label}.pt", opts)
        for a, b in ((got["pre"], pre), (got["dec"], dec)):
            rel = ((a - b).abs().max() / b.abs().max()).item()
            assert rel <= 1e-4, (name, label, rel)
            assert torch.equal(a.argmax(-1), b.argmax(-1)), (name, label)
        if label == "cached":
            assert got["stats"]["misses"] > 0 and got["stats"]["bytes_h2d"] > 0  # experts really moved


def test_a_type_the_device_kernels_lack_is_refused_by_name(files, tmp_path):
    """Never a silent bf16 expansion: one LiteError naming the tensor and its type."""
    import gguf
    from retype_gguf import retype

    tq2_0 = gguf.GGMLQuantizationType.TQ2_0  # the kernels cover every type lite reads; a ternary one they lack
    bad = retype(
        files["mixed"], tmp_path / "tq2_0.gguf", lambda ref: tq2_0 if ref.name == "blk.2.ffn_up_exps.weight" else None
    )
    code = "import lite, sys\ntry:\n    lite.load(sys.argv[1], device='cpu')\nexcept lite.LiteError as e:\n    print(e)"
    env = {**os.environ, "LITE_DEVICE_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(bad)], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert "tensor blk.2.ffn_up_exps.weight has type TQ2_0, which the device kernels cannot multiply" in out.stdout
