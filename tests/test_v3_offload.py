"""V3-family models through the offload engine (the predictor ranks by the biased sigmoid router), on the CPU and,
where present, on CUDA: the device kernels' f32 parity with transformers, and bf16."""

from __future__ import annotations

import pytest
import torch
from test_model import TOKENS, assert_parity
from test_offload import run
from tiny_models import reference_logits

import lite
from lite.convert import convert
from quant.gguf_file import GGUFFile

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_v3_equals_resident_and_prefetch_hits(hf_v3, tmp_path, device):
    """Experts in RAM behind 2k slots per layer: the same logits as all resident, and router-predicted prefetch
    raises the hit rate over no prefetch."""
    path = tmp_path / "q.gguf"
    convert(hf_v3, path)
    model, gguf = lite.load(str(path), device=device, experts_on="device"), GGUFFile(path)
    base_pre, base_dec, _, _ = run(model, gguf, device, experts_on="device")
    slots = 2 * model.config.num_experts_per_tok
    rates = {}
    for prefetch in (False, 1):
        opts = dict(experts_on="ram", expert_cache=slots, prefetch=prefetch, miss_policy="fetch")
        pre, dec, stats, _ = run(model, gguf, device, **opts)
        assert torch.equal(pre, base_pre) and all(torch.equal(a, b) for a, b in zip(dec, base_dec))
        rates[prefetch] = stats["total"]["hit_rate"]
    print(f"{hf_v3.name} on {device}: hit rate {rates[False]:.3f} without prefetch, {rates[1]:.3f} with")
    assert rates[1] > rates[False]


@cuda
def test_cuda_parity(hf_v3, tmp_path):
    """float32 on CUDA (the Triton kernels) matches transformers; bf16 is close (mean cosine, as for V2)."""
    convert(hf_v3, tmp_path / "m.gguf", outtype="f32")
    ref = reference_logits(hf_v3, TOKENS)
    ours = lite.load(str(tmp_path / "m.gguf"), device="cuda", dtype=torch.float32).logits(TOKENS)
    print(
        f"{hf_v3.name} on cuda f32: max |err| / max |logit| = {float((ours - ref).abs().max() / ref.abs().max()):.2e}"
    )
    assert_parity(ours, ref)
    bf16 = lite.load(str(tmp_path / "m.gguf"), device="cuda").logits(TOKENS)
    assert float(torch.nn.functional.cosine_similarity(bf16, ref, dim=-1).mean()) >= 0.98


def test_device_path_runs_v3(tmp_path, monkeypatch):
    """The GPU code path (Triton kernels, interpreted on CPU tensors; tests/test_device_path.py) on the V3-like
    model, experts on a 1-slot RAM-tier cache: the CPU path's float32 logits."""
    pytest.importorskip("triton", reason="the device kernels are written in Triton")
    import test_device_path as device_path
    from tiny_models import make_checkpoint

    hf = make_checkpoint(tmp_path / "hf", "v3", seed=3)
    convert(hf, tmp_path / "q4.gguf")
    # its first MoE layer is layer 2 (two dense layers lead), so the script checks the last layer's layouts
    monkeypatch.setattr(device_path, "SCRIPT", device_path.SCRIPT.replace("layers[1]", "layers[-1]"))
    pre, dec = device_path.cpu_logits(tmp_path / "q4.gguf", monkeypatch)
    got = device_path.device_path_logits(tmp_path / "q4.gguf", tmp_path / "out.pt", device_path.CONFIGS["cached"])
    for a, b in ((got["pre"], pre), (got["dec"], dec)):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert got["stats"]["misses"] > 0 and got["stats"]["prefetches_issued"] > 0
