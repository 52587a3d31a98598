"""Prompt-processing and decode speed, time to first token, and expert-cache statistics (like llama-bench).

Each repetition starts from an empty cache, prefills `n_prompt` random tokens in one feed (pp), then decodes
`n_gen` tokens greedily one at a time (tg). A short warm-up run comes first and is not counted.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from typing import Any

import torch

from lite.errors import ContextTooSmall, LiteError
from lite.generate import stream_generate
from lite.sampling import SamplingParams
from quant import prefill

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0)


def summarize(values: list[float]) -> dict[str, float]:
    """Median and spread (min, max, standard deviation) of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def bench(
    model: Any,
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 3,
    ctx: int | None = None,
    seed: int = 0,
    trace: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns plain data: per-repetition figures, their summaries and `model.stats()`."""
    if n_prompt < 1 or n_gen < 1 or repetitions < 1:
        raise LiteError("n_prompt, n_gen and repetitions must each be at least 1")
    ctx = ctx or n_prompt + n_gen
    if n_prompt + n_gen > ctx:
        raise ContextTooSmall(
            f"{n_prompt} prompt plus {n_gen} generated tokens exceed the context of {ctx}; lower them or use a "
            "larger context"
        )
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (n_prompt,), generator=g).tolist()
    session = model.session(ctx)

    def one_run(n_p: int, n_g: int) -> tuple[float, float, float]:
        """(prefill, decode (n_g - 1 steps), TTFT) seconds: greedy, never stopping at an end token."""
        session.reset()
        *_, last = stream_generate(model, prompt[:n_p], GREEDY, max_tokens=n_g, session=session, ignore_eos=True)
        return last.ttft, last.generation_seconds, last.ttft

    one_run(min(n_prompt, 16), min(n_gen, 4))  # warm-up: first-call allocations, kernel selection
    model.reset_stats()
    recorder = None
    if trace:
        from offload.trace import TraceRecorder

        recorder = TraceRecorder(trace)
    runs = []
    # the transformer holds the backend it calls; swap it there (model.experts is only a reference)
    attr = "transformer.experts" if hasattr(getattr(model, "transformer", None), "experts") else None
    with recorder.attached(model, attr) if recorder else contextlib.nullcontext():
        for r in range(repetitions):
            pp_s, tg_s, ttft = one_run(n_prompt, n_gen)
            runs.append({
                "pp_tps": n_prompt / pp_s,
                "tg_tps": (n_gen - 1) / tg_s if n_gen > 1 and tg_s > 0 else float("nan"),
                "ttft_s": ttft,
                "threads": torch.get_num_threads(),  # at the end of the run (lite.threads.auto() may change it)
            })  # fmt: skip
            if progress:
                progress(r + 1, repetitions)
    if recorder:
        recorder.close()
    stats = model.stats()
    return {
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "repetitions": repetitions,
        "ctx": ctx,
        "threads": torch.get_num_threads(),
        "prefill_gemm": prefill.gemm_kind() if model.device.type == "cpu" else None,  # quant/prefill.py
        "runs": runs,
        "pp_tps": summarize([r["pp_tps"] for r in runs]),
        "tg_tps": summarize([r["tg_tps"] for r in runs]),
        "ttft_s": summarize([r["ttft_s"] for r in runs]),
        "stats": stats,
        "trace": trace,
    }
