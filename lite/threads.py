"""CPU threads that survive a busy machine.

torch's CPU kernels, and lite's native ones (`at::parallel_for`), run on OpenMP threads (GNU libgomp). Every
parallel region ends in a barrier that waits for its slowest thread, and a waiting thread spins (~7 ms) before
it sleeps. When another multi-threaded program wants the same cores, a region finishes only once the scheduler
has given each of its threads a turn, and the spinning threads burn the very time slices the others need:
decode of the demo model fell from ~1,200 to 5-70 tokens/s beside a 2-thread torch job, while one thread kept
several hundred.

`ThreadGovernor` (`auto()` installs one for the process; the `lite` command does unless -t, OMP_NUM_THREADS or
LITE_THREADS=torch say otherwise): torch's thread count follows the cores that other processes leave free. It
compares the busy time of the CPUs this process may use with its own CPU time, over the time since its last
look, and re-checks at most every `interval` seconds from `tick()`, which every `Session.feed` calls (between
two forward passes, in the thread that runs them: under OpenMP the thread count belongs to the calling
thread). One look costs ~0.1 ms (it reads /proc/stat). On an idle machine it keeps torch's count, so idle
speed is unchanged; beside another job it drops to the free cores, where no barrier waits for a thread that
the scheduler has parked.

Not done: a passive wait (`OMP_WAIT_POLICY=PASSIVE`, which must be in the environment before torch loads).
Waiting threads then sleep at once, which saves a busy machine's -t 2 from collapse (5-90 -> 150-770 tok/s
there), but each parallel region then pays a futex wake-up: on an idle machine 2-thread decode of the demo
model ran at 0.34x its spinning speed (0.70x with GOMP_SPINCOUNT=1000, 0.99x with 10000, which no longer
helps when busy); see benchmarks/README.md, "Busy machine". A user can still set it.
"""

from __future__ import annotations

import math
import os
import time
from typing import NamedTuple

import psutil
import torch

OFF_SWITCH = "LITE_THREADS"  # LITE_THREADS=torch: torch's own thread count, no governor


def enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether lite manages threads: not with LITE_THREADS=torch."""
    return (os.environ if environ is None else environ).get(OFF_SWITCH, "auto").strip().lower() != "torch"


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask), by number."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return list(range(os.cpu_count() or 1))


class Sample(NamedTuple):
    time: float  # monotonic seconds
    busy: float  # busy seconds of the usable CPUs since boot, whoever used them
    own: float  # CPU seconds of this process (all its threads, and children it waited for)


def sample(cpus: list[int], process: psutil.Process | None = None) -> Sample:
    per_cpu = psutil.cpu_times(percpu=True)
    chosen = [per_cpu[i] for i in cpus if i < len(per_cpu)] if max(cpus) < len(per_cpu) else per_cpu
    busy = 0.0
    for c in chosen:  # not idle, not iowait; steal counts (another VM had the core); guest is inside user
        busy += c.user + c.system + getattr(c, "nice", 0.0) + getattr(c, "irq", 0.0)
        busy += getattr(c, "softirq", 0.0) + getattr(c, "steal", 0.0)
    own = (process or psutil.Process()).cpu_times()
    own_s = own.user + own.system + getattr(own, "children_user", 0.0) + getattr(own, "children_system", 0.0)
    return Sample(time.monotonic(), busy, own_s)


def others_load(a: Sample, b: Sample) -> float:
    """Cores kept busy by other processes between two samples (0 when the window is empty)."""
    wall = b.time - a.time
    if wall <= 0:
        return 0.0
    return max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / wall)


def threads_for(free: float, most: int) -> int:
    """Threads for `free` idle cores: a core counts while others leave at least 70% of it, so a 2-core machine
    with a job keeping half a core busy runs 1 thread. At least 1, at most `most`."""
    return max(1, min(most, math.floor(free + 0.3)))


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the cores other processes leave free (at most `most`, by default
    torch's own count when the governor is made)."""

    def __init__(self, most: int | None = None, interval: float = 0.5, min_window: float = 0.1):
        self.most = max(1, most or torch.get_num_threads())
        self.interval = interval
        self.min_window = min_window
        self.cpus = usable_cpus()
        self.process = psutil.Process()
        self.last = sample(self.cpus, self.process)
        self.threads = torch.get_num_threads()
        self.others = 0.0  # the last measurement, in cores
        self.changes = 0

    def update(self, wait: bool = False) -> int:
        """Measure since the last look and set the thread count; returns it. With `wait`, a window shorter than
        `min_window` is first waited out (a start-up decision); without, a short window changes nothing."""
        elapsed = time.monotonic() - self.last.time
        if elapsed < self.min_window:
            if not wait:
                return self.threads
            time.sleep(self.min_window - elapsed)
        now = sample(self.cpus, self.process)
        self.others = others_load(self.last, now)
        self.last = now
        want = threads_for(len(self.cpus) - self.others, self.most)
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
            self.changes += 1
        self.threads = want
        return want

    def tick(self) -> None:
        """Cheap unless `interval` has passed since the last look; then `update()`."""
        if time.monotonic() - self.last.time >= self.interval:
            self.update()


_governor: ThreadGovernor | None = None


def auto(most: int | None = None, interval: float = 0.5) -> ThreadGovernor:
    """Let torch's thread count follow the free cores from now on in this process (every `Session.feed` ticks
    it). The first look measures from this call: call `.update(wait=True)` on the result for a decision now
    (the CLI does, once the model is loaded). Returns the governor."""
    global _governor
    _governor = ThreadGovernor(most, interval)
    return _governor


def fixed() -> None:
    """Stop adapting (e.g. after an explicit thread count)."""
    global _governor
    _governor = None


def governor() -> ThreadGovernor | None:
    return _governor


def tick() -> None:
    """Called before each forward pass; a no-op unless `auto()` was called."""
    if _governor is not None:
        _governor.tick()
