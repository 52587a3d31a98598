"""The offload engine's invariant (logits do not depend on where experts live), its counters on constructed
routing sequences, and the trace recorder on a real model."""

from __future__ import annotations

import itertools
from pathlib import Path

import gguf
import pytest
import torch

import lite
from offload import build_experts
from offload.engine import ExpertEngine
from quant.gguf_file import GGUFFile

Q = gguf.GGMLQuantizationType

PROMPT = [0, 5, 17, 300, 42, 7, 99, 100, 101, 3, 250, 11]
DECODE = [8, 400, 77, 2]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_q4_gguf) -> Path:
    return tiny_q4_gguf


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf):
    return lite.load(str(tiny_gguf), device="cpu", experts_on="device")


def disk_ram(model, slots: int, lru: int, ctx: int = 32) -> int:
    """`ram_memory` for a CPU disk tier of `slots` slots per layer and a RAM LRU of `lru` experts: on the CPU one
    budget holds the latent cache for `ctx` tokens, the slots and the LRU (offload/planner.py)."""
    a, specs = model.config, model.experts.specs
    latent = a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * 4 * ctx
    return latent + slots * sum(s.nbytes for s in specs.values()) + lru * max(s.nbytes for s in specs.values())


def run(
    model, gguf: GGUFFile, device: str = "cpu", **opts
) -> tuple[torch.Tensor, list[torch.Tensor], dict, ExpertEngine]:
    """Swap in an engine built with `opts`; prefill logits [T, vocab], one-token decode logits, stats, and the
    engine (closed)."""
    old = model.experts
    opts.setdefault("ctx", 32)
    engine = build_experts(old.stacks, old.predict, device, model.dtype, gguf_file=gguf, **opts)
    model.transformer.experts = model.experts = engine
    try:
        s = model.session(32)
        pre = s.feed(PROMPT, all_logits=True)
        dec = [s.feed([t]) for t in DECODE]
        return pre, dec, model.stats(), engine
    finally:
        engine.close()
        model.transformer.experts = model.experts = old


def test_logits_identical_across_cache_tier_prefetch_and_miss_policy(tiny_model, tiny_gguf):
    gguf = GGUFFile(tiny_gguf)
    base_pre, base_dec, _, _ = run(tiny_model, gguf, experts_on="device")
    n = tiny_model.config.n_routed_experts
    combos = list(itertools.product([1, 2, n], ["ram", "disk"], [False, 1], ["fetch", "cpu", "auto"]))
    combos += [(1, "ram", 2, "fetch"), (2, "disk", 2, "auto")]  # a deeper lookahead
    accesses = set()
    for slots, tier, prefetch, miss in combos:
        opts = dict(experts_on=tier, expert_cache=slots, prefetch=prefetch, miss_policy=miss)
        if tier == "disk":
            # a RAM LRU of 4 of the 16 experts, in the planner's bytes per expert (it sizes the LRU)
            opts["ram_memory"] = disk_ram(tiny_model, slots, 4)
        pre, dec, st, _ = run(tiny_model, gguf, **opts)
        # the same arithmetic on every path: bit-identical
        assert torch.equal(pre, base_pre), opts
        assert all(torch.equal(a, b) for a, b in zip(dec, base_dec)), opts
        t = st["total"]
        accesses.add(t["hits"] + t["misses"])  # distinct experts per call: a property of the routing alone
        assert len(accesses) == 1
        if miss == "fetch":
            assert t["cpu_experts"] == 0
        if miss == "cpu":
            assert t["cpu_experts"] == t["misses"]
        if not prefetch:
            assert t["prefetches_issued"] == 0
        if slots == n and tier == "ram" and miss == "fetch":
            assert t["misses"] <= 2 * n  # each expert misses at most once once the cache holds all
        assert (t["bytes_disk"] > 0) == (tier == "disk")


def test_engine_matches_resident_experts_and_reference(tiny_gguf, hf_lite, tmp_path):
    """Resident baseline ~ engine (only the order of the k-term sum may differ); with an f32 file, the smallest
    cache on the disk tier matches transformers."""
    from tiny_models import reference_logits

    from lite.convert import convert
    from offload.resident import ResidentExperts

    m = lite.load(str(tiny_gguf), device="cpu", experts_on="device")
    m = lite.load(str(tiny_gguf), device="cpu", experts_on="disk", expert_cache=1, ctx=32, ram_memory=disk_ram(m, 1, 4))
    engine_logits = m.logits(PROMPT)
    m.transformer.experts = m.experts = ResidentExperts(m.experts.stacks, m.device, m.dtype)
    resident = m.logits(PROMPT)
    assert (engine_logits - resident).abs().max() <= 1e-5 * resident.abs().max()

    f32 = tmp_path / "f32.gguf"
    convert(hf_lite, f32, outtype="f32")
    full = lite.load(str(f32), device="cpu", experts_on="device")
    ours = lite.load(str(f32), device="cpu", experts_on="disk", expert_cache=1, ctx=32, ram_memory=disk_ram(full, 1, 4),
                     miss_policy="fetch").logits(PROMPT)  # fmt: skip
    ref = reference_logits(hf_lite, PROMPT)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


# ---- counters on constructed routing ------------------------------------------------------------------------


def engine_for(path: Path, slots: int, predicted: dict, **opts) -> ExpertEngine:
    """An engine over the file's expert stacks whose predictor returns `predicted[layer]` (a list of rows)."""
    from offload import ExpertStacks

    f = GGUFFile(path)
    stacks = {}
    for name in f.tensors:
        if name.endswith("ffn_gate_exps.weight"):
            i = int(name.split(".")[1])
            stacks[i] = ExpertStacks(*(f.tensors[f"blk.{i}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")))

    def predict(layer: int, h: torch.Tensor, width: int) -> torch.Tensor:
        return torch.tensor(predicted[layer])

    opts.setdefault("experts_on", "ram")
    return build_experts(stacks, predict, "cpu", torch.float32, expert_cache=slots, **opts)


def call(engine: ExpertEngine, layer: int, rows: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor(rows)
    hidden = engine.specs[layer].hidden
    x = torch.randn(len(rows), hidden)
    return engine(layer, x, ids, torch.full(ids.shape, 0.5))


def test_counters_on_constructed_routing(tiny_gguf):
    from offload.sim import simulate_prefetch

    # MoE layers 1 and 2, 2 slots each, single tokens with top-2 routing; layer 2's experts are predicted
    # from layer 1's residual (lookahead 1); nothing predicts layer 1 (layer 0's on_residual is not called)
    sel = {1: [[[0, 1]], [[0, 2]], [[3, 4]], [[3, 4]]], 2: [[[5, 6]], [[5, 6]], [[0, 7]], [[1, 7]]]}
    pred = [[[5, 6]], [[5, 7]], [[0, 7]], [[2, 3]]]
    e = engine_for(tiny_gguf, 2, {}, prefetch=1, miss_policy="fetch")
    h = torch.zeros(1, 8)
    calls = []
    for step in range(4):
        e.predict = lambda layer, h, width, step=step: torch.tensor(pred[step])
        e.on_residual(1, h)
        call(e, 1, sel[1][step])
        call(e, 2, sel[2][step])
        calls.append({"layer": 2, "selected": sel[2][step], "predicted": pred[step]})
    s = e.stats()
    l1, l2 = s["layers"][1], s["layers"][2]
    # layer 1, plain LRU: miss 0 1 | hit 0, miss 2 (evicts 1) | miss 3 4 (evict 0 2) | hit 3 4
    assert (l1["hits"], l1["misses"], l1["prefetches_issued"]) == (3, 5, 0)
    # layer 2: step 0 prefetch 5 6, both hit | prefetch 7 (evicts 6); hit 5, miss 6 (evicts unused 7)
    # | prefetch 0 7 (evict 5 6), both hit | prefetch 2 3 (evict 0 7); miss 1 7 (evict unused 2 3)
    assert (l2["hits"], l2["misses"], l2["prefetches_issued"], l2["prefetches_used"]) == (5, 3, 7, 4)
    assert l2["prefetch_precision"] == 4 / 7 and l2["prefetch_recall"] == 4 / (4 + 3)
    sim = simulate_prefetch(calls, 2)  # the simulator replays the same policy
    assert (sim["hits"], sim["misses"], sim["prefetches_issued"], sim["prefetches_used"]) == (5, 3, 7, 4)
    tot = s["total"]
    assert tot["bytes_h2d"] == (7 + 8) * e.expert_bytes  # every prefetch and every fetched miss is one copy
    assert tot["bytes_disk"] == 0 and tot["cpu_experts"] == 0
    assert tot["hits"] == 8 and tot["misses"] == 8 and s["slots_per_layer"] == 2 and s["tier"] == "ram"
    e.reset_stats()
    assert e.stats()["total"]["hits"] == 0 and e.stats()["total"]["bytes_h2d"] == 0


def test_counters_cpu_policy_and_disk_reads(tiny_gguf):
    e = engine_for(tiny_gguf, 2, {}, prefetch=False, miss_policy="cpu", experts_on="disk", ram_memory=10**9)
    from offload.experts import raw_nbytes

    raw = raw_nbytes(e.stacks[1])
    for rows in ([[0, 1]], [[0, 1]], [[1, 2], [2, 3]]):
        call(e, 1, rows)
    t = e.stats()["total"]
    # nothing is ever copied to the device with the cpu policy and no prefetch: every access misses
    assert (t["hits"], t["misses"], t["cpu_experts"], t["bytes_h2d"]) == (0, 7, 7, 0)
    assert t["bytes_disk"] == 4 * raw  # experts 0..3 read once each; the RAM LRU holds them afterwards
    tight = engine_for(tiny_gguf, 2, {}, prefetch=False, miss_policy="cpu", experts_on="disk",
                       ram_memory=2 * sum(sp.nbytes for sp in e.specs.values()) + 2 * e.expert_bytes)  # fmt: skip
    for rows in ([[0, 1]], [[2, 3]], [[0, 1]]):
        call(tight, 1, rows)
    assert tight.stats()["total"]["bytes_disk"] == 6 * raw  # an LRU of 2 experts: 0 and 1 are read twice


def test_prefetch_never_evicts_what_the_current_layer_needs(tiny_gguf):
    # global scope: 2 MoE layers x 2 slots = 4 slots shared; layer 1 holds 0 and 1, then layer 1's residual
    # predicts four experts of layer 2: only the two slots not holding layer 1's experts may be taken
    e = engine_for(tiny_gguf, 2, {2: [[0, 1, 2, 3]]}, prefetch=1, miss_policy="fetch", cache_scope="global")
    call(e, 1, [[0, 1]])
    e.on_residual(1, torch.zeros(1, 8))
    resident = set(e.lru.keys())
    assert {(1, 0), (1, 1)} <= resident
    assert e.stats()["layers"][2]["prefetches_issued"] == 2
    out_before = call(e, 1, [[0, 1]])
    assert e.stats()["layers"][1]["hits"] == 2 and out_before.shape[1] == e.specs[1].hidden


def test_fewer_slots_than_active_experts(tiny_gguf):
    """One slot per layer and a prefill batch needing many experts: they take turns in the slot."""
    e = engine_for(tiny_gguf, 1, {}, prefetch=False, miss_policy="fetch")
    rows = [[0, 1], [2, 3], [4, 5], [6, 7]]
    ids = torch.tensor(rows)
    x = torch.randn(4, e.specs[1].hidden)
    out = e(1, x, ids, torch.ones(4, 2))
    ref = torch.zeros_like(x)
    for t, row in enumerate(rows):
        for j in row:
            ref[t] += e.store.read_cpu((1, j))(x[t : t + 1])[0]
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert e.stats()["total"]["misses"] == 8


@pytest.mark.usefixtures("native_kernels")
def test_one_token_runs_its_experts_in_one_native_call(tiny_gguf):
    """On the CPU the default recipe's experts stay GGUF bytes, and a decode step's experts run in one fused native
    call: the chained per-expert matmuls up to an exp() ulp that may flip one 8-bit code of the hidden state."""
    from offload.experts import moe_one_token

    e = engine_for(tiny_gguf, 8, {}, prefetch=False, miss_policy="fetch")
    assert e.native_layers[1] and e.store.read_cpu((1, 0)).native
    x = torch.randn(1, e.specs[1].hidden, generator=torch.Generator().manual_seed(0))
    experts, w = [e.store.read_cpu((1, j)) for j in (0, 3, 5)], [0.5, 0.3, 0.2]
    fused = moe_one_token(experts, x, w)
    chained = sum(wj * ex(x) for wj, ex in zip(w, experts))
    torch.testing.assert_close(fused, chained, rtol=0, atol=1e-3 * chained.abs().max().item())
    # the engine's decode path is that call, experts in ascending id order whatever the routing order
    out = e(1, x, torch.tensor([[5, 0, 3]]), torch.tensor([[0.2, 0.5, 0.3]]))
    assert torch.equal(out, fused)
    assert e.stats()["total"]["misses"] == 3


def test_trace_recorder_on_a_model(tiny_gguf, tmp_path):
    from offload.sim import report
    from offload.trace import TraceRecorder, read_trace

    m = lite.load(str(tiny_gguf), device="cpu", experts_on="ram", expert_cache=2)
    with TraceRecorder(tmp_path / "t.jsonl") as rec, rec.attached(m):
        list(m.generate(PROMPT, max_tokens=4, temperature=0))
    meta, calls = read_trace(tmp_path / "t.jsonl")
    k = m.config.num_experts_per_tok
    assert meta["top_k"] == k and meta["layers"] == [1, 2]
    assert calls[0]["layer"] == 1 and len(calls[0]["selected"]) == len(PROMPT)
    assert all(len(row) == k for c in calls for row in c["selected"])
    assert calls[1]["predicted"] is not None and len(calls[1]["predicted"]) == len(calls[1]["selected"])
    rep = report(calls, [2, 8])
    assert rep["sizes"][8]["belady"] >= rep["sizes"][8]["lru"]
    assert rep["prediction_accuracy"] > 0  # the next layer's gate on this residual names some of its experts


def test_prediction_is_the_gate_of_the_next_layer_on_the_residual_leaving_this_one(tiny_model):
    """on_residual sees the residual stream leaving each layer; predict(L, h, width) ranks layer L's experts by
    its gate on h, and its top k is exactly the routing the model would do on that h."""
    from lite.model import rms_norm, route

    seen: dict[int, torch.Tensor] = {}
    engine = tiny_model.experts
    engine.on_residual = lambda layer, h: seen.__setitem__(layer, h.clone())
    try:
        logits = tiny_model.logits(PROMPT)
    finally:
        del engine.on_residual
    w, args = tiny_model.transformer.weights, tiny_model.config
    last = max(seen)
    assert last == len(w.layers) - 1  # the last layer's output is the final residual: it makes the logits
    final = w.output(rms_norm(seen[last], w.norm, args.rms_norm_eps)).float()
    torch.testing.assert_close(final[-1], logits[-1], rtol=0, atol=0)
    for layer in (1, 2):
        h = seen[layer - 1]
        ranked = engine.predict(layer, h, args.n_routed_experts)
        assert ranked.shape == (len(PROMPT), args.n_routed_experts)
        ids = route(args, w.layers[layer].router, rms_norm(h, w.layers[layer].ffn_norm, args.rms_norm_eps))[0]
        assert torch.equal(ranked[:, : ids.shape[1]], ids)


def test_prefetch_fills_a_layers_slots_with_its_likeliest_experts(tiny_gguf):
    widths = []

    def predict(layer: int, h: torch.Tensor, width: int) -> torch.Tensor:
        widths.append(width)
        return torch.tensor([[6, 2, 7, 0, 1]])[:, :width]  # likeliest first

    e = engine_for(tiny_gguf, 3, {}, prefetch=1, miss_policy="fetch")
    e.predict = predict
    call(e, 2, [[0, 1]])  # layer 2 holds 0 and 1; its third slot is free
    e.on_residual(1, torch.zeros(1, 8))
    assert widths == [3]  # as many as the layer has slots
    assert sorted(k for k in e.lru.keys() if k[0] == 2) == [(2, 2), (2, 6), (2, 7)]
    assert e.stats()["layers"][2]["prefetches_issued"] == 3
    call(e, 2, [[2, 6]])
    assert e.stats()["layers"][2]["prefetches_used"] == 2


def test_a_prefetch_still_in_flight_is_a_late_hit(tiny_gguf):
    import time

    e = engine_for(tiny_gguf, 2, {2: [[3, 4]]}, prefetch=1, miss_policy="fetch")
    fill = e._fill
    e._fill = lambda *a: (time.sleep(0.2), fill(*a))[1]  # a slow copy: the worker fills one slot at a time
    e.on_residual(1, torch.zeros(1, 8))
    call(e, 2, [[3, 4]])  # both predicted, both still copying
    t = e.stats()["total"]
    assert (t["hits"], t["hits_late"], t["misses"]) == (2, 2, 0)
    assert t["hit_rate"] == 1.0 and t["effective_hit_rate"] == 0.0 and t["stall_s"] > 0
    call(e, 2, [[3, 4]])  # resident now: in time
    assert e.stats()["total"]["effective_hit_rate"] == 2 / 4


def test_disk_tier_prefetch_moves_only_experts_already_in_ram(tiny_gguf):
    e = engine_for(tiny_gguf, 2, {2: [[3, 4]]}, prefetch=1, miss_policy="fetch", experts_on="disk",
                   ram_memory=10**9)  # fmt: skip
    e.on_residual(1, torch.zeros(1, 8))  # 3 and 4 are still on disk: no speculative reads
    t = e.stats()["total"]
    assert (t["prefetches_issued"], t["bytes_disk"]) == (0, 0)
    call(e, 2, [[3, 5]])  # misses read 3 and 5 into RAM (and the device slots)
    call(e, 2, [[0, 1]])  # evicts them from the 2 device slots; RAM keeps them
    e.on_residual(1, torch.zeros(1, 8))
    assert e.stats()["layers"][2]["prefetches_issued"] == 1  # 3 is in RAM now; 4 is not
    assert (2, 3) in e.lru and (2, 4) not in e.lru
    from offload.experts import raw_nbytes

    assert e.stats()["total"]["bytes_disk"] == 4 * raw_nbytes(e.stacks[2])


# ---- llama.cpp's Q4_K_M mixture: each layer's experts in their own types -----------------------------------------


@pytest.fixture(scope="module")
def mixed_gguf(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny model as llama.cpp's Q4_K_M lays out V2-Lite: Q4_K gate/up, and `ffn_down_exps` (rows not
    256-aligned) Q8_0 on one layer ("more bits") and Q5_0 on the other, so one expert's bytes differ per layer."""
    from retype_gguf import retype

    downs = {"blk.1.ffn_down_exps.weight": Q.Q8_0, "blk.2.ffn_down_exps.weight": Q.Q5_0}
    out = tmp_path_factory.mktemp("mixed") / "tiny-q4_k_m.gguf"
    return retype(tiny_gguf, out, lambda ref: downs.get(ref.name))


def test_mixed_type_experts_run_through_every_tier(mixed_gguf):
    """The crash this guards against: every cache slot sized from the first MoE layer's types ("cannot copy a
    gguf (2048, 1408) weight into a gguf (2048, 1408) one"). Slots now follow each layer's own layout."""
    gguf_file = GGUFFile(mixed_gguf)
    assert gguf_file.tensors["blk.1.ffn_down_exps.weight"].qtype == Q.Q8_0
    model = lite.load(str(mixed_gguf), device="cpu", experts_on="device")
    specs = model.experts.specs
    assert specs[1].nbytes != specs[2].nbytes  # the two layers' experts really differ in size
    base_pre, base_dec, _, _ = run(model, gguf_file, experts_on="device")
    for slots, tier, prefetch, miss, scope in [
        (1, "ram", 1, "fetch", "layer"),
        (2, "disk", 1, "auto", "layer"),
        (2, "ram", False, "cpu", "layer"),
        (3, "disk", 2, "fetch", "global"),  # one pool for all layers: slots sized for the largest expert
        (8, "ram", 1, "fetch", "global"),
    ]:
        opts = dict(experts_on=tier, expert_cache=slots, prefetch=prefetch, miss_policy=miss, cache_scope=scope)
        if tier == "disk":
            opts["ram_memory"] = disk_ram(model, slots, 5)  # an LRU of a few experts: real disk reads
        pre, dec, st, _ = run(model, gguf_file, **opts)
        assert torch.equal(pre, base_pre), opts
        assert all(torch.equal(a, b) for a, b in zip(dec, base_dec)), opts
        assert st["total"]["misses"] > 0 or slots == 8


def test_mixed_type_file_generates_the_same_off_the_device_tier(mixed_gguf):
    """`lite.load` as `lite run --experts-on ram|disk` calls it (the command that crashed): the same greedy tokens."""
    outs = []
    full = lite.load(str(mixed_gguf), device="cpu", experts_on="device")
    for opts in ({"experts_on": "device"}, {"experts_on": "ram", "expert_cache": 1},
                 {"experts_on": "disk", "expert_cache": 1, "ctx": 32, "ram_memory": disk_ram(full, 1, 4)}):  # fmt: skip
        model = lite.load(str(mixed_gguf), device="cpu", **opts)
        outs.append(list(model.generate(PROMPT, max_tokens=6, temperature=0.0)))
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 0


def test_prefill_moves_each_needed_expert_once_per_layer(tiny_model, tiny_gguf):
    """A 300-token prompt behind 1-2 slots per layer: one forward per layer for the whole prompt, and each expert
    the layer needs copied in once (bytes_h2d <= 1.1x the bytes of the experts it needs; prefetch on)."""
    import lite.generate

    gguf_file = GGUFFile(tiny_gguf)
    prompt = [(7 * i + 3) % tiny_model.config.vocab_size for i in range(300)]
    assert lite.generate.prefill_chunk(tiny_model.config, 4, all_logits=False) >= len(prompt)
    old = tiny_model.experts
    for slots, prefetch in ((1, False), (2, 1)):
        opts = dict(experts_on="ram", expert_cache=slots, prefetch=prefetch, miss_policy="fetch")
        engine = build_experts(old.stacks, old.predict, "cpu", tiny_model.dtype, gguf_file=gguf_file, **opts)
        tiny_model.transformer.experts = tiny_model.experts = engine
        try:
            tiny_model.session(512).feed(prompt)
            st = engine.stats()
        finally:
            engine.close()
            tiny_model.transformer.experts = tiny_model.experts = old
        needed = sum((v["hits"] + v["misses"]) * engine.specs[layer].nbytes for layer, v in st["layers"].items())
        assert st["total"]["hits"] + st["total"]["misses"] <= len(engine.layers) * engine.n_experts  # one pass
        assert needed <= st["total"]["bytes_h2d"] + slots * len(engine.layers) * engine.expert_bytes
        assert st["total"]["bytes_h2d"] <= 1.1 * needed, (slots, prefetch, st["total"]["bytes_h2d"], needed)


def test_backends_implement_the_protocol(tiny_model):
    from offload import ExpertBackend
    from offload.resident import ResidentExperts

    assert isinstance(tiny_model.experts, ExpertBackend)
    assert isinstance(ResidentExperts(tiny_model.experts.stacks, "cpu", torch.float32), ExpertBackend)
    assert not isinstance(object(), ExpertBackend)


def test_async_prefetch_keeps_logits_and_prefetches(tiny_model, tiny_gguf):
    """The CUDA default, forced on the CPU: predicted ids go to the worker, which plans and copies while the forward
    pass goes on (a late prediction is dropped). Logits stay bit-identical; prefetches are issued and used."""
    gguf_file = GGUFFile(tiny_gguf)
    base_pre, base_dec, _, _ = run(tiny_model, gguf_file, experts_on="device")
    for slots, tier, scope in ((2, "ram", "layer"), (1, "disk", "layer"), (3, "ram", "global"), (4, "disk", "global")):
        opts = dict(experts_on=tier, expert_cache=slots, prefetch=1, miss_policy="fetch", cache_scope=scope)
        if tier == "disk":
            opts["ram_memory"] = disk_ram(tiny_model, slots, 4)
        for _ in range(3):  # thread timing differs from run to run
            pre, dec, st, engine = run(tiny_model, gguf_file, async_prefetch=True, **opts)
            assert engine.async_prefetch
            assert torch.equal(pre, base_pre), opts
            assert all(torch.equal(a, b) for a, b in zip(dec, base_dec)), opts
            t = st["total"]
            assert t["prefetches_used"] <= t["prefetches_issued"]
            assert t["prefetches_issued"] > 0 or tier == "disk"  # the disk tier prefetches only what RAM holds
            assert engine.pending == {} or all(f.done() for f in engine.pending.values())


def test_async_prefetch_lands_before_use_and_drops_when_overtaken(tiny_gguf):
    import threading

    e = engine_for(tiny_gguf, 2, {2: [[3, 4]]}, prefetch=1, miss_policy="fetch", async_prefetch=True)
    h = torch.zeros(1, 8)
    call(e, 1, [[0, 1]])
    e.on_residual(1, h)
    e.worker.submit(lambda: None).result()  # the worker has planned and copied
    assert e.stats()["layers"][2]["prefetches_issued"] == 2
    call(e, 2, [[3, 4]])
    assert e.stats()["layers"][2]["hits"] == 2 and e.stats()["layers"][2]["prefetches_used"] == 2
    # the next pass: the worker is held up, the forward pass reaches layer 2 first, the prediction is dropped
    gate = threading.Event()
    e.worker.submit(gate.wait)
    call(e, 1, [[0, 1]])  # hits only: nothing waits for the worker
    e.predict = lambda layer, h, width: torch.tensor([[5, 6]])
    e.on_residual(1, h)
    call(e, 2, [[3, 4]])
    gate.set()
    e.worker.submit(lambda: None).result()
    assert (2, 5) not in e.lru and (2, 6) not in e.lru
    assert e.stats()["layers"][2]["prefetches_issued"] == 2
    e.close()


def test_stall_time_counts_the_wait_for_a_slow_read(tiny_gguf):
    """stall_s is the time the forward pass waited for expert bytes: a disk read made 50 ms slower shows up."""
    import time

    e = engine_for(tiny_gguf, 2, {}, prefetch=False, miss_policy="fetch", experts_on="disk", ram_memory=10**9)
    read = e.store.read_raw

    def slow(key):
        time.sleep(0.05)
        return read(key)

    e.store.read_raw = slow
    call(e, 1, [[0, 1]])  # two misses, each read on the worker while the forward pass waits
    stall = e.stats()["total"]["stall_s"]
    assert 0.09 <= stall <= 5, stall
    call(e, 1, [[0, 1]])  # hits: no waiting
    assert e.stats()["total"]["stall_s"] == stall
    e.close()
