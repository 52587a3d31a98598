"""The generation worker: one thread runs the requests one at a time on one model and one working latent cache.

torch is not async, so the ASGI handlers never touch the model (nor the tokenizer, which is not thread-safe):
they `submit` a `Job` and read its events (`Start`, `Delta`s, then `Done` or an `ApiError`; `jobs.py`), which
the worker hands to their event loop. A job marked `cancelled` (its client went away)
stops at the next token. Requests re-use the longest token prefix held by the working session or saved in the
`PrefixCache`, so a chat client that resends its whole history each turn prefills only the new message.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from lite.chat import TurnStats, render_prompt
from lite.errors import LiteError
from lite.generate import stream_generate
from lite.sampling import SamplingParams
from lite.serve.jobs import Delta, Done, Job, Start, StopText
from lite.serve.openai_shapes import ApiError, GenerationRequest
from lite.serve.prefix_cache import PrefixCache, bytes_per_token, common_prefix

log = logging.getLogger("lite.serve")

SNAPSHOT_SLACK = 16  # the working session may drop this many tokens (a reply's tail) without saving them first
FINISH = {"stop": "stop", "length": "length", "context": "length", "interrupted": "cancelled"}


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Counters:
    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    decode_tokens: int = 0  # tokens after each request's first, over decode_seconds (as `lite run` counts)
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0
    busy_seconds: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)


class Engine:
    """Owns the model, its working session and the prefix cache; `start()` runs the worker thread."""

    def __init__(
        self,
        model: Any,
        *,
        ctx: int,
        defaults: SamplingParams,
        max_tokens: int = 512,
        max_queue: int = 16,
        cache_bytes: int = 1 << 30,
    ):
        if model.tokenizer is None:
            raise LiteError("this model file has no tokenizer; convert it from a folder with tokenizer.json")
        self.model, self.tokenizer = model, model.tokenizer
        self.ctx, self.defaults, self.max_tokens = ctx, defaults, max_tokens
        self.max_queue = max_queue
        self.session = model.session(ctx)
        self.cache = PrefixCache(cache_bytes)
        self.counters = Counters()
        self.expert_stats: dict[str, Any] = self._expert_stats()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the event loop's side -------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lite-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running and queued requests and end the worker."""
        with self._cond:
            self._stopping = True
            if self._running is not None:
                self._running.cancelled = True
            while self._waiting:
                self._waiting.popleft().emit(ApiError(503, "the server is shutting down", code="shutting_down"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull when --max-queue requests already wait."""
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if len(self._waiting) + (self._running is not None) > self.max_queue:
                self.counters.rejected += 1
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it still waits, else stop it at the next token."""
        job.cancelled = True
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.counters.cancelled += 1
                job.emit(Done("cancelled"))  # its handler may still wait for an event

    def queue_length(self) -> int:
        return len(self._waiting)

    def busy(self) -> bool:
        return self._running is not None

    def retry_after(self) -> int:
        c = self.counters
        per_request = c.busy_seconds / c.requests if c.requests else 1.0
        return max(1, math.ceil(per_request * (len(self._waiting) + 1)))

    def stats(self) -> dict[str, Any]:
        c = self.counters
        total = self.expert_stats.get("total", {}) if isinstance(self.expert_stats, dict) else {}
        return {
            "requests": {
                "served": c.requests, "errors": c.errors, "cancelled": c.cancelled, "rejected": c.rejected,
                "running": self.busy(), "queued": self.queue_length(), "max_queue": self.max_queue,
            },
            "tokens": {
                "prompt": c.prompt_tokens, "cached": c.cached_tokens,
                "prefilled": c.prompt_tokens - c.cached_tokens, "generated": c.generated_tokens,
            },
            "speed": {
                "decode_tokens_per_second": c.decode_tokens / c.decode_seconds if c.decode_seconds else None,
                "prefill_tokens_per_second": (
                    (c.prompt_tokens - c.cached_tokens) / c.prefill_seconds if c.prefill_seconds else None
                ),
                "last_request": c.last,
            },
            "prefix_cache": {
                **self.cache.stats(), "working_session_tokens": len(self.session.tokens),
                "latent_bytes_per_token": bytes_per_token(self.model.config, self.session.cache.dtype),
            },
            "experts": {
                "hit_rate": total.get("hit_rate"), "effective_hit_rate": total.get("effective_hit_rate"),
                "prefetch_precision": total.get("prefetch_precision"),
                "prefetch_recall": total.get("prefetch_recall"), "total": total,
            },
            "context": self.ctx,
        }  # fmt: skip

    # -- the worker thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._running = self._waiting.popleft()
            t0 = time.perf_counter()
            try:
                self._process(job)
            except ApiError as e:
                self.counters.errors += 1
                job.emit(e)
            except Exception as e:  # one line in the log, an OpenAI-shaped 500 to the client, the server lives on
                self.counters.errors += 1
                log.error("request failed: %s: %s", type(e).__name__, e)
                self.session.reset()  # its cache rows may be half written
                status = 400 if isinstance(e, LiteError) else 500
                job.emit(ApiError(status, str(e) or type(e).__name__))
            finally:
                self.counters.busy_seconds += time.perf_counter() - t0
                self.expert_stats = self._expert_stats()
                with self._cond:
                    self._running = None

    def _expert_stats(self) -> dict[str, Any]:
        try:
            return self.model.stats()
        except Exception:  # a backend without statistics
            return {}

    def _prompt(self, req: GenerationRequest) -> tuple[list[int], Any, int]:
        """The prompt's token ids, and the prefix-cache entry worth restoring (or None) with its shared length."""
        held = self.session.tokens
        if req.kind == "completion":
            if isinstance(req.prompt, str):
                ids = self.tokenizer.encode(req.prompt, add_bos=True)
            else:
                ids = list(req.prompt or [])
                vocab = self.model.config.vocab_size
                if not all(0 <= t < vocab for t in ids):
                    raise ApiError(400, f"prompt: token ids must lie in 0..{vocab - 1}", "prompt", "invalid_value")
            entry, n = self.cache.match(ids)
            return ids, (entry if n > common_prefix(held, ids) else None), n
        assert req.messages is not None  # a chat request (completions returned above)
        ids = render_prompt(self.tokenizer, req.messages, held)
        c_work = common_prefix(held, ids)
        if c_work == len(held):
            return ids, None, 0
        entry, n = self.cache.match(ids)
        if entry is None or n <= c_work:
            return ids, None, 0
        ids = render_prompt(self.tokenizer, req.messages, entry.tokens)
        return ids, entry, common_prefix(entry.tokens, ids)

    def _bring(self, prompt: list[int], entry: Any, n_entry: int) -> int:
        """Put the longest saved prefix of `prompt` into the working session (saving what it would lose
        first); returns the number of prompt tokens that need no prefill."""
        held = self.session.tokens
        c_work = common_prefix(held, prompt)
        if len(held) - c_work > SNAPSHOT_SLACK and self.cache.max_bytes > 0:
            self.cache.store(held, self.session.cache.data[:, : len(held)])
        if entry is not None and n_entry > c_work:
            self.cache.restore(entry, self.session, n_entry)
            c_work = n_entry
        return min(c_work, len(prompt) - 1)

    def _process(self, job: Job) -> None:
        req, c = job.request, self.counters
        if job.cancelled:
            c.cancelled += 1
            job.emit(Done("cancelled"))
            return
        t0 = time.perf_counter()
        prompt, entry, n_entry = self._prompt(req)
        if len(prompt) >= self.ctx:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.ctx} tokens. However, your "
                f"{'messages' if req.kind == 'chat' else 'prompt'} resulted in {len(prompt)} tokens.",
                "messages" if req.kind == "chat" else "prompt", "context_length_exceeded",
            )  # fmt: skip
        cached = self._bring(prompt, entry, n_entry)
        job.emit(Start(len(prompt), cached))
        params = req.params(self.defaults)
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        stats = TurnStats(ctx=self.ctx)
        stop_text, parts, finish = StopText(req.stop), [], None
        pieces = stats.texts(
            stream_generate(
                self.model,
                prompt,
                params,
                max_tokens=req.max_tokens or self.max_tokens,
                session=self.session,
                generator=torch.Generator().manual_seed(seed),
                should_stop=lambda: job.cancelled,
                t0=t0,
            )
        )
        stream = req.stream  # a whole response needs no event per token (each one wakes the event loop)
        try:
            for piece in pieces:
                out, hit = stop_text.add(piece)
                if out:
                    parts.append(out)
                    if stream:
                        job.emit(Delta(out))
                if hit:
                    finish = "stop"
                    break
        finally:
            pieces.close()
        if finish is None:
            out = stop_text.flush()
            if out:
                parts.append(out)
                if stream:
                    job.emit(Delta(out))
            finish = FINISH.get(stats.finish, "stop")
        done = Done(
            finish, len(prompt), cached, len(stats.token_ids), "".join(parts), stats.ttft, stats.gen_tps
        )  # fmt: skip
        c.requests += 1
        c.cancelled += finish == "cancelled"
        c.prompt_tokens += len(prompt)
        c.cached_tokens += cached
        c.generated_tokens += len(stats.token_ids)
        c.prefill_seconds += stats.prompt_seconds
        if stats.gen_tokens > 1:
            c.decode_tokens += stats.gen_tokens - 1
            c.decode_seconds += stats.gen_seconds
        c.last = {
            "prompt_tokens": len(prompt), "cached_tokens": cached, "completion_tokens": len(stats.token_ids),
            "ttft_seconds": stats.ttft, "decode_tokens_per_second": stats.gen_tps, "finish_reason": finish,
        }  # fmt: skip
        job.emit(done)
