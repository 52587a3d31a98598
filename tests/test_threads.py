"""Threads on a busy machine (lite/threads.py): a thread count that follows the cores other processes leave free."""

from __future__ import annotations

import pytest
import torch

from lite import threads


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


def test_governor_sees_other_processes(monkeypatch):
    """Real /proc/stat: with every usable CPU kept busy by other processes, one thread is left."""
    import subprocess
    import sys
    import time

    cpus = threads.usable_cpus()
    if len(cpus) > 8:
        pytest.skip("too many CPUs to keep busy in a test")
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    hog = "import time\nend = time.monotonic() + 4\nwhile time.monotonic() < end: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in cpus]
    try:
        time.sleep(0.5)  # they are running
        g = threads.ThreadGovernor(most=max(2, len(cpus)))
        time.sleep(1.0)
        assert g.update() == 1 and g.others >= 0.6 * len(cpus)
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def test_lite_bench_follows_the_free_cores_by_default(lite, monkeypatch):
    from cli.common import DEFAULT_MODEL

    if not DEFAULT_MODEL.is_file():
        pytest.skip("the bundled demo model is missing")
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LITE_THREADS", raising=False)
    try:
        out = lite("bench", "-p", "8", "-n", "8", "-r", "1").stdout
        assert "(following the free cores)" in out
        assert threads.governor() is not None and 1 <= threads.governor().threads <= threads.governor().most
        out = lite("bench", "-p", "8", "-n", "8", "-r", "1", "-t", "1").stdout
        assert "1 repetitions, 1 thread" in out and "following" not in out and threads.governor() is None
    finally:
        threads.fixed()
        torch.set_num_threads(before)
