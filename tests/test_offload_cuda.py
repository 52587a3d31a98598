"""The CUDA path: pinned host copies, the copy stream and events. Runs only where CUDA is present."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from test_offload import run as run_on

import lite
from offload import build_experts
from offload.experts import write_expert
from quant.gguf_file import GGUFFile

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_model(tmp_path_factory, request):
    """The tiny V2-Lite-like model with 4-bit experts; LITE_TEST_GGUF names a ready file (for GPU machines
    without transformers)."""
    out = os.environ.get("LITE_TEST_GGUF")
    if not out:
        from lite.convert import convert

        out = tmp_path_factory.mktemp("offload_cuda") / "tiny-q4.gguf"
        convert(request.getfixturevalue("hf_lite"), out)
    return lite.load(str(out), device="cuda", experts_on="device"), GGUFFile(out)


def run(model, gguf, **opts):
    """Prefill and decode logits as one tensor, stats and the engine: test_offload's run, on CUDA."""
    pre, dec, stats, engine = run_on(model, gguf, "cuda", **opts)
    return torch.cat([pre, torch.stack(dec)]), stats, engine


def test_cuda_engine_invariant(cuda_model):
    model, gguf = cuda_model
    base, _, _ = run(model, gguf, experts_on="device")
    n = model.config.n_routed_experts
    for slots, tier, prefetch in itertools.product([1, 2, n], ["ram", "disk"], [False, 1, 2]):
        opts = dict(experts_on=tier, expert_cache=slots, prefetch=prefetch, miss_policy="fetch")
        if tier == "disk":
            opts["ram_memory"] = 4 * model.experts.plan.expert_bytes
        out, st, engine = run(model, gguf, **opts)
        if slots == n:  # no expert waits for a slot: the same grouped kernel on the same bytes, bit-identical
            assert torch.equal(out, base), opts
        else:  # a call needing more experts than slots runs them one by one (other kernels): bf16-close
            cos = torch.nn.functional.cosine_similarity(out.float(), base.float(), dim=-1)
            assert float(cos.min()) >= 0.99, (opts, cos)
        assert engine.staging.buffers.is_pinned()  # copies go through the fixed pinned ring
        assert all(p.device.type == "cuda" for p in engine.pools)
        assert st["total"]["bytes_h2d"] > 0


def test_cuda_cpu_miss_policy_close(cuda_model):
    """Experts computed by the CPU kernels: other arithmetic (bf16 on both), so close rather than identical."""
    model, gguf = cuda_model
    base, _, _ = run(model, gguf, experts_on="device")
    for tier, miss in (("ram", "cpu"), ("disk", "cpu"), ("ram", "auto")):
        opts = dict(experts_on=tier, expert_cache=1, miss_policy=miss)
        if tier == "disk":
            opts["ram_memory"] = 4 * model.experts.plan.expert_bytes
        out, st, _ = run(model, gguf, **opts)
        rel = ((out - base).abs().max() / base.abs().max()).item()
        print(f"cpu-computed experts ({tier}, {miss}): max relative logit difference {rel:.2e}")
        assert rel <= 2e-2, (opts, rel)
        if miss == "cpu":
            assert st["total"]["cpu_experts"] == st["total"]["misses"] > 0


def test_copy_stream_overlaps_and_events(cuda_model):
    """A prefetch returns before its copy is done (asynchronous), and the data lands intact."""
    model, gguf = cuda_model
    engine = build_experts(model.experts.stacks, model.experts.predict, "cuda", model.dtype, gguf_file=gguf,
                           experts_on="ram", expert_cache=2, prefetch=1, miss_policy="fetch",
                           async_prefetch=False)  # fmt: skip
    try:
        engine.predict = lambda layer, h, width: torch.tensor([[3, 5]], device="cuda")
        engine.on_residual(1, torch.zeros(1, 8, device="cuda"))
        assert engine.stats()["layers"][2]["prefetches_issued"] == 2
        assert engine.events  # copies in flight are tracked by events, not waited for
        torch.cuda.synchronize()
        pool, row = engine._pool_row(engine.lru.lookup((2, 3)))
        spec = engine.specs[2]
        host = torch.zeros(spec.nbytes, dtype=torch.uint8)
        write_expert(host, engine.store.read_raw((2, 3)), spec)  # the GGUF bytes, laid out as in a slot
        assert torch.equal(pool[row, : spec.nbytes].cpu(), host)
    finally:
        engine.close()


def test_async_prefetch_on_cuda(cuda_model):
    """The CUDA default: on_residual returns without a host sync; the worker plans and copies once the ids land."""
    model, gguf = cuda_model
    engine = build_experts(model.experts.stacks, model.experts.predict, "cuda", model.dtype, gguf_file=gguf,
                           experts_on="ram", expert_cache=2, prefetch=1, miss_policy="fetch")  # fmt: skip
    try:
        assert engine.async_prefetch
        pred, h = torch.tensor([[3, 5]], device="cuda"), torch.zeros(1, 8, device="cuda")
        engine.predict = lambda layer, h, width: pred
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call in on_residual raises
        try:
            engine.on_residual(1, h)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        engine.worker.submit(lambda: None).result()
        assert engine.stats()["layers"][2]["prefetches_issued"] == 2
        torch.cuda.synchronize()
        pool, row = engine._pool_row(engine.lru.lookup((2, 5)))
        spec = engine.specs[2]
        host = torch.zeros(spec.nbytes, dtype=torch.uint8)
        write_expert(host, engine.store.read_raw((2, 5)), spec)
        assert torch.equal(pool[row, : spec.nbytes].cpu(), host)
    finally:
        engine.close()
