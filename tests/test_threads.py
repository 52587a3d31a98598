"""Threads on a busy machine (lite/threads.py, cli/main.py): passive OpenMP waits set before torch loads, and a
thread count that follows the cores other processes leave free."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lite import threads

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "LITE_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**base, "PYTHONPATH": str(ROOT), **env}, cwd=str(ROOT),
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def test_the_entry_point_sets_a_passive_wait_before_torch_loads():
    probe = "import os, sys; import cli.main; print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))"
    assert python(probe) == "False PASSIVE"
    assert python(probe, OMP_WAIT_POLICY="ACTIVE") == "False ACTIVE"  # the user's own setting wins
    assert python(probe, LITE_THREADS="torch") == "False None"  # torch's defaults, for comparisons


@pytest.mark.skipif(len(threads.usable_cpus()) < 2, reason="needs 2 CPUs for an OpenMP worker thread")
def test_waiting_threads_sleep_instead_of_spinning():
    """After a 2-thread matmul, libgomp's worker spins ~7 ms by default before it sleeps; under the `lite`
    command's environment it sleeps at once: no CPU time while the main thread sleeps."""
    code = """
import cli.main
import time, psutil, torch
torch.set_num_threads(2)
a, p, spent = torch.randn(256, 256), psutil.Process(), 0.0
for _ in range(20):
    a @ a
    c = sum(p.cpu_times()[:2]); time.sleep(0.03); spent += sum(p.cpu_times()[:2]) - c
print(round(spent * 1000))
"""
    assert int(python(code)) <= 40  # ms of CPU during 600 ms of sleeps (spinning: ~140 on an idle 2-core machine)


def test_others_load_subtracts_our_own_cpu_time():
    a = threads.Sample(time=10.0, busy=100.0, own=5.0)
    b = threads.Sample(time=12.0, busy=103.0, own=6.0)  # 3 busy core-seconds in 2 s, 1 of them ours
    assert threads.others_load(a, b) == pytest.approx(1.0)
    assert threads.others_load(b, b) == 0.0
    assert threads.others_load(a, threads.Sample(12.0, 100.5, 6.0)) == 0.0  # tick rounding: never negative


@pytest.mark.parametrize(
    "free, most, want",
    [(2.0, 2, 2), (1.75, 2, 2), (1.6, 2, 1), (1.0, 2, 1), (0.1, 2, 1), (0.0, 2, 1), (15.2, 8, 8), (5.8, 8, 6)],
)
def test_threads_for_free_cores(free, most, want):
    assert threads.threads_for(free, most) == want


def test_governor_follows_the_free_cores(monkeypatch):
    """Scripted samples on a 2-CPU machine: idle, then another job takes ~1.5 cores, then it ends."""
    clock = [0.0]
    samples = iter([
        threads.Sample(0.0, 0.0, 0.0),  # made
        threads.Sample(1.0, 1.1, 1.0),  # others 0.1 cores: 2 threads
        threads.Sample(2.0, 3.1, 1.5),  # others 1.5: 1 thread
        threads.Sample(3.0, 5.0, 2.4),  # others 1.0: still 1
        threads.Sample(4.0, 6.0, 3.4),  # others 0: 2 again
    ])  # fmt: skip
    set_to = []
    monkeypatch.setattr(threads, "usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(threads, "sample", lambda cpus, process=None: next(samples))
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(torch, "get_num_threads", lambda: set_to[-1] if set_to else 2)
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    g = threads.ThreadGovernor(most=2, interval=0.5)
    clock[0] = 0.2
    g.tick()  # before the interval: no look
    assert g.last.time == 0.0 and set_to == []
    seen = []
    for t in (1.0, 2.0, 3.0, 4.0):
        clock[0] = t
        g.tick()
        seen.append((round(g.others, 2), g.threads))
    assert seen == [(0.1, 2), (1.5, 1), (1.0, 1), (0.0, 2)]
    assert set_to == [1, 2] and g.changes == 2  # set only when it changes


def test_session_feed_ticks_the_governor(monkeypatch):
    from cli.common import DEFAULT_MODEL

    if not DEFAULT_MODEL.is_file():
        pytest.skip("the bundled demo model is missing")
    import lite

    model = lite.load(str(DEFAULT_MODEL), device="cpu")
    ticks = []
    monkeypatch.setattr(threads, "tick", lambda: ticks.append(1))
    s = model.session(32)
    s.feed([0, 5, 6])
    s.feed([7])
    assert len(ticks) == 2


def test_cli_thread_choice(monkeypatch):
    from cli.common import set_threads

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.delenv("LITE_THREADS", raising=False)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's count: kept, not adapted
        assert set_threads(None) is None and threads.governor() is None
        assert set_threads(3) is None and calls == [3]
        monkeypatch.delenv("OMP_NUM_THREADS")
        g = set_threads(None)
        assert g is not None and threads.governor() is g and g.most >= 1
        assert set_threads(1) is None and threads.governor() is None  # -t: exactly that, no governor
        monkeypatch.setenv("LITE_THREADS", "torch")
        assert set_threads(None) is None
    finally:
        threads.fixed()
