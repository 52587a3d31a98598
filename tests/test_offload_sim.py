"""The cache simulator, the slot LRU and the trace format, on hand-computed cases."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import torch

from offload.policy import SlotLRU, cpu_seconds, prefer_cpu, prefetch_plan
from offload.sim import accesses, prediction_accuracy, simulate_belady, simulate_lfu, simulate_lru, simulate_prefetch
from offload.trace import TraceRecorder, read_trace

CACHE_SIM = Path(__file__).resolve().parents[1] / "benchmarks" / "cache_sim.py"


def calls_of(experts: list[int], layer: int = 1, predicted: list[int] | None = None) -> list[dict]:
    return [
        {"step": t, "layer": layer, "selected": [[e]], "predicted": None if predicted is None else [[predicted[t]]]}
        for t, e in enumerate(experts)
    ]


SEQ = [0, 1, 2, 0, 1, 3, 0]


def test_hand_computed_hit_counts():
    seq = accesses(calls_of(SEQ))
    # LRU, 2 slots: every access misses (each returning expert was evicted just before)
    assert simulate_lru(seq, 2)["hits"] == 0
    # Belady, 2 slots: evicts 1 at t=2 (0 is needed sooner), then 2 at t=4, then 1 at t=5 -> hits at t=3, t=6
    assert simulate_belady(seq, 2) == {"hits": 2, "misses": 5, "hit_rate": 2 / 7}
    # LFU, 2 slots: the ties and counts work out to no hit either
    assert simulate_lfu(seq, 2)["hits"] == 0
    # 3 slots: LRU keeps 0 and 1 until 3 arrives: hits at t=3, 4, 6
    assert simulate_lru(seq, 3)["hits"] == 3 and simulate_belady(seq, 3)["hits"] == 3
    # big enough: only compulsory misses
    assert simulate_lru(seq, 4)["misses"] == 4 and simulate_belady(seq, 4)["misses"] == 4


def test_sets_protect_their_members():
    # A call needing {0, 1} with 2 slots holding {1, 2}: 1 is a hit and must not be evicted to make room for 0.
    calls = [
        {"layer": 1, "selected": [[1], [2]]},
        {"layer": 1, "selected": [[0], [1]]},
        {"layer": 1, "selected": [[1], [0]]},
    ]
    r = simulate_lru(accesses(calls), 2)
    assert (r["hits"], r["misses"]) == (3, 3)
    # one slot for a two-expert set: the experts take turns in the slot, the last one run stays (1 after
    # the second call, a hit in the third)
    r = simulate_lru(accesses(calls), 1)
    assert (r["hits"], r["misses"]) == (1, 5)


def test_belady_beats_lru_on_random_traces():
    rng = random.Random(0)
    for _ in range(20):
        calls = [
            {"layer": rng.randrange(1, 3), "selected": [rng.sample(range(8), 2) for _ in range(rng.randrange(1, 3))]}
            for _ in range(60)
        ]
        seq = accesses(calls)
        for size in (4, 5, 7):  # at least the largest set (2 tokens x top-2): Belady is optimal there
            assert simulate_belady(seq, size)["hits"] >= simulate_lru(seq, size)["hits"]
            assert simulate_belady(seq, size)["hits"] >= simulate_lfu(seq, size)["hits"]
        single = accesses([{"layer": 1, "selected": [[rng.randrange(6)]]} for _ in range(80)])
        for size in (1, 2, 3):
            assert simulate_belady(single, size)["hits"] >= simulate_lru(single, size)["hits"]


def test_prefetch_policy_counts():
    perfect = simulate_prefetch(calls_of(SEQ, predicted=SEQ), 2)
    assert perfect == {
        "hits": 7,
        "misses": 0,
        "hit_rate": 1.0,
        "decode_hit_rate": 1.0,
        "prefetches_issued": 7,
        "prefetches_used": 7,
        "precision": 1.0,
        "recall": 1.0,
    }
    # always predicting expert 3: prefetched at t=0, 2 and 4 (the misses at t=1 and t=3 evict it as the
    # least recently used), used once, at t=5
    wrong = simulate_prefetch(calls_of(SEQ, predicted=[3] * 7), 2)
    assert (wrong["hits"], wrong["misses"], wrong["prefetches_issued"], wrong["prefetches_used"]) == (1, 6, 3, 1)
    assert wrong["precision"] == 1 / 3 and wrong["recall"] == 1 / 7 and wrong["decode_hit_rate"] == 1 / 7
    # a prompt pass (two tokens) misses both experts; the decode steps after it are counted on their own
    mixed = [{"layer": 1, "selected": [[0], [1]], "predicted": None}] + calls_of(SEQ, predicted=SEQ)
    r = simulate_prefetch(mixed, 2)
    assert r["decode_hit_rate"] == 1.0 and r["hit_rate"] == 7 / 9
    assert prediction_accuracy(calls_of(SEQ, predicted=SEQ)) == 1.0
    assert prediction_accuracy(calls_of(SEQ, predicted=[3] * 7)) == 1 / 7


def test_slot_lru_and_prefetch_plan():
    lru = SlotLRU([1, 2], 2, "layer")
    assert lru.allocate((1, 0)) == (0, None)  # layer 1's group holds slots 0 and 1, handed out from 0
    lru.allocate((1, 1))
    lru.touch((1, 0))
    slot, evicted = lru.allocate((1, 2))
    assert evicted == (1, 1)  # least recently used
    assert lru.allocate((1, 3), protected={(1, 0), (1, 2)}) is None
    assert lru.lookup((2, 0)) is None and len(lru.keys()) == 2
    # prefetch: most often predicted first, at most the capacity, never evicting the protected
    plan = prefetch_plan(lru, 1, [5, 6, 6, 7, 7, 7], protected={(1, 0)})
    assert [k for k, _, _ in plan] == [(1, 7)]  # (1, 6) would have to evict the protected (1, 0) or (1, 7)
    fresh = SlotLRU([1], 2, "layer")  # ties keep the order given: likeliest first
    assert [k for k, _, _ in prefetch_plan(fresh, 1, [9, 3, 5], set())] == [(1, 9), (1, 3)]
    # with a host tier over the disk: only experts already in RAM, plus at most max_host_misses others
    in_ram = {(1, 3), (1, 5)}.__contains__
    assert [k for k, _, _ in prefetch_plan(SlotLRU([1], 3), 1, [9, 3, 7, 5], set(), in_ram, 0)] == [(1, 3), (1, 5)]
    plan = prefetch_plan(SlotLRU([1], 3), 1, [9, 3, 7, 5], set(), in_ram, 1)
    assert [k for k, _, _ in plan] == [(1, 9), (1, 3), (1, 5)]
    g = SlotLRU([1, 2], 2, "global")
    for e in range(4):
        g.allocate((1 + e % 2, e))
    assert g.allocate((2, 9))[1] == (1, 0)


def test_trace_roundtrip_and_cli(tmp_path, capsys):
    path = tmp_path / "t.jsonl"

    class Inner:
        layers = [1, 2]
        n_experts = 4

        def on_residual(self, layer, h):
            pass

        def __call__(self, layer, x, ids, weights):
            return x

    def predict(layer, h, width):
        return torch.tensor([[layer, 3]])

    with TraceRecorder(path) as rec:
        backend = rec.wrap(Inner(), predict)
        x = torch.zeros(1, 4)
        for _ in range(2):
            for layer in (0, 1, 2):
                backend.on_residual(layer, x)
                if layer:
                    backend(layer, x, torch.tensor([[layer, 0]]), torch.ones(1, 2))
    meta, calls = read_trace(path)
    assert meta == {"layers": [1, 2], "n_experts": 4, "top_k": 2}
    assert [(c["step"], c["layer"]) for c in calls] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert calls[1]["selected"] == [[2, 0]] and calls[1]["predicted"] == [[2, 3]]
    assert calls[0]["predicted"] == [[1, 3]]  # layer 1 predicted from layer 0's residual
    out = subprocess.run([sys.executable, str(CACHE_SIM), str(path), "--sizes", "1,2", "--json"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    rep = json.loads(out)
    assert set(rep["sizes"]) == {"1", "2"} and rep["calls"] == 4


def test_cpu_cost_follows_the_measured_points_not_one_slope():
    """The CPU's cost of an expert is interpolated between the measured token counts (the 8-bit kernels' steep
    slope below ~16 rows, the expanded bf16 GEMM's shallow one above), so a large prefill group is not priced as
    if every token cost what a decode token does."""
    pts = [(1, 1.0), (8, 8.0), (64, 10.0)]
    assert [cpu_seconds(pts, n) for n in (1, 4, 8, 36, 64, 120)] == [1.0, 4.0, 8.0, 9.0, 10.0, 12.0]
    assert cpu_seconds([(1, 2.5)], 100) == 2.5
    # a copy costing 9.5 s: 36 tokens run on the CPU, 64 are fetched (one slope through 1 and 8 would fetch both)
    assert prefer_cpu("auto", 36, pts, copy_s=9.5, device_free=True)
    assert not prefer_cpu("auto", 64, pts, copy_s=9.5, device_free=True)
    assert prefer_cpu("cpu", 64, None, None, device_free=True) and not prefer_cpu("fetch", 1, None, None, True)
