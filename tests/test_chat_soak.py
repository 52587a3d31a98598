"""A long chat through a pseudo-terminal (tests/soak.py, which benchmarks/soak_chat.py runs longer): no turn fails
and memory stays flat once the first turns have warmed up (it grew by a fifth in 60 turns before bf16 GEMM rows
were bucketed)."""

from __future__ import annotations

import pytest

pytest.importorskip("pexpect")


def test_a_long_chat_keeps_working_and_its_memory_flat():
    from cli.common import DEFAULT_MODEL

    if not DEFAULT_MODEL.is_file():
        pytest.skip("the bundled demo model is missing")
    import soak

    r = soak.soak(60, every=10, clear_every=0, env={"OMP_NUM_THREADS": "1"})
    assert r["errors"] == []
    assert r["drops"] > 0 and r["regens"] == 1  # the context filled and old turns were dropped; /regen ran
    growth = soak.rss_at(r["samples"], 60) / soak.rss_at(r["samples"], 20)
    assert growth < 1.08, [(s["turn"], s["rss"] >> 20) for s in r["samples"]]
