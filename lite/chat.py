"""A chat conversation as a library: messages, templating, one latent cache, streaming replies.

The conversation lives in one `Session`. Each turn renders the whole conversation with the model's chat
template, keeps the longest common prefix already in the cache and feeds only the rest, so a new turn
prefills just its new tokens. /regen rewinds to the end of the prompt; a conversation that would not fit
the context drops its oldest turns (and reports it), never truncating silently.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from lite.errors import LiteError
from lite.generate import common_prefix
from lite.sampling import SamplingParams, check, sample
from lite.text import replaced_note, scrub

FORMAT = "lite-chat"
SETTINGS = ("temp", "top_p", "top_k", "min_p", "max_tokens", "seed", "repeat_penalty")


@dataclass
class TurnStats:
    """What one reply cost. `finish` is "stop" (end of sequence), "length" (max_tokens), "context" (the
    context is full), "interrupted" or "error" (the turn failed and was undone)."""

    prompt_tokens: int = 0  # tokens prefilled this turn (only the new ones)
    prompt_len: int = 0  # the whole prompt (conversation + generation prompt) in tokens
    prompt_seconds: float = 0.0
    gen_tokens: int = 0
    gen_seconds: float = 0.0  # from the first generated token to the last
    ttft: float = 0.0  # from the request to the first generated token
    ctx_used: int = 0
    ctx: int = 0
    finish: str = "stop"
    dropped_turns: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    peak_rss: int = 0  # peak resident memory of the process since it started (never goes down)
    peak_gpu: int = 0  # peak CUDA memory allocated by torch since the process started (0 on CPU)
    notes: list[str] = field(default_factory=list)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float | None:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 and self.prompt_tokens else None

    @property
    def gen_tps(self) -> float | None:
        return (self.gen_tokens - 1) / self.gen_seconds if self.gen_tokens > 1 and self.gen_seconds > 0 else None

    @property
    def hit_rate(self) -> float | None:
        n = self.cache_hits + self.cache_misses
        return self.cache_hits / n if n else None


_peak_seen = 0


def process_peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes; it never goes down. The kernel's high-water mark
    (getrusage; updated lazily) combined with every RSS this function has seen."""
    global _peak_seen
    current = psutil.Process().memory_info().rss
    try:
        import resource

        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        kernel = kernel if sys.platform == "darwin" else kernel * 1024
    except ImportError:  # Windows
        kernel = 0
    _peak_seen = max(_peak_seen, current, kernel)
    return _peak_seen


def cache_counts(stats: dict[str, Any]) -> tuple[int, int]:
    """(hits, misses) of the expert cache from `model.stats()`; (0, 0) when the backend keeps no stats."""
    total = stats.get("total", stats) if isinstance(stats, dict) else {}
    return int(total.get("hits", 0) or 0), int(total.get("misses", 0) or 0)


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], held: list[int]) -> list[int]:
    """Token ids of `messages` plus the generation prompt, re-using the tokens `held` in a cache.

    Where `held` spells text that the rendered conversation starts with (the model's own reply tokens, which
    may be tokenized differently from a fresh encode), those tokens are kept and only the rest is encoded, so
    that a turn prefills only its new tokens. Otherwise: the chat template's own encoding.
    """
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    render = getattr(tokenizer, "render_chat", None)
    if not held or render is None or common_prefix(held, ids) == len(held):
        return ids
    text = render(messages, add_generation_prompt=True)
    done = tokenizer.decode(held, special=True)
    if len(text) > len(done) and text.startswith(done):
        return list(held) + tokenizer.encode(text[len(done) :], add_bos=False, parse_special=True)
    return ids


class Chat:
    """A multi-turn conversation with `model` (a `lite` Model, or anything honouring its Session contract).

    `send(text)` and `regenerate()` are generators of text pieces (UTF-8 safe); after one is exhausted,
    `last` holds its `TurnStats`. `stop()` (e.g. from a SIGINT handler) ends the current reply at the next
    token, keeping what was said so far.
    """

    def __init__(
        self,
        model: Any,
        *,
        system: str | None = None,
        params: SamplingParams | None = None,
        max_tokens: int = 512,
        ctx: int | None = None,
        prefill_chunk: int = 128,
    ):
        if getattr(model, "tokenizer", None) is None:
            raise LiteError("this model file has no tokenizer; convert it from a folder with tokenizer.json")
        self.model = model
        self.tokenizer = model.tokenizer
        self.session = model.session(ctx)
        self.params = params or SamplingParams()
        self.max_tokens = check("max_tokens", max_tokens)
        self.prefill_chunk = prefill_chunk
        self.messages: list[dict[str, str]] = []
        self.last: TurnStats | None = None
        self._stop = False
        self.generator = torch.Generator()
        self.set_seed(self.params.seed)
        if system:
            self.set_system(system)

    # -- state -------------------------------------------------------------------------------------------
    @property
    def ctx(self) -> int:
        return self.session.ctx

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def set_system(self, text: str | None) -> None:
        """Set (or with None/"" remove) the system prompt; the cache is re-used up to where it changes."""
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def set_seed(self, seed: int | None) -> None:
        """Restart the random stream: the same seed and inputs give the same replies."""
        seed = check("seed", seed)
        self.seed = seed if seed is not None else random.randrange(2**31)
        self.params.seed = seed
        self.generator.manual_seed(self.seed)

    def set(self, name: str, value: str) -> None:
        """`/set NAME VALUE` for NAME in SETTINGS; raises LiteError on a bad name or value (nothing changes)."""
        name = {"temperature": "temp", "n": "max_tokens"}.get(name, name)
        if name not in SETTINGS:
            raise LiteError(f"unknown setting {name!r}; use one of: {', '.join(SETTINGS)}")
        v = check("temperature" if name == "temp" else name, value, name)
        if name == "seed":
            self.set_seed(v)
        elif name == "max_tokens":
            self.max_tokens = v
        else:
            setattr(self.params, "temperature" if name == "temp" else name, v)

    def settings(self) -> dict[str, Any]:
        p = self.params
        return {
            "temp": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p,
            "repeat_penalty": p.repeat_penalty, "max_tokens": self.max_tokens, "seed": self.seed, "ctx": self.ctx,
        }  # fmt: skip

    def clear(self) -> None:
        """A new conversation (the system prompt stays)."""
        system = self.system
        self.messages = []
        self.set_system(system)
        self.session.reset()

    def stop(self) -> None:
        self._stop = True

    # -- save / load -------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        data = {"format": FORMAT, "version": 1, "messages": self.messages, "settings": self.settings()}
        try:
            Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise LiteError(f"cannot write {path}: {e.strerror}; choose another path") from None

    def load(self, path: str | Path) -> int:
        """Replace the conversation with the one saved in `path`; returns the number of messages."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise LiteError(f"cannot read {path}: {e.strerror}; check the path") from None
        except ValueError:
            raise LiteError(f"{path} is not JSON; /load reads files written by /save") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        ok = isinstance(messages, list) and all(
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise LiteError(f"{path} holds no conversation; /load reads files written by /save")
        assert isinstance(messages, list)  # checked just above
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return len(self.messages)

    # -- turns -------------------------------------------------------------------------------------------
    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply. Undecodable input (lone surrogates) is replaced with
        U+FFFD and reported in the turn's notes. If the turn fails, the conversation is as it was before."""
        before = list(self.messages)
        text, bad = scrub(text)
        self.messages.append({"role": "user", "content": text})
        return self._reply(before, [replaced_note(bad, "the message")] if bad else [])

    def regenerate(self) -> Iterator[str]:
        """Drop the last reply and answer the last user message again (the random stream moves on)."""
        before = list(self.messages)
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            self.messages = before
            raise LiteError("nothing to regenerate yet; send a message first")
        return self._reply(before)

    def _render(self) -> list[int]:
        return render_prompt(self.tokenizer, self.messages, self.session.tokens)

    def _fit(self, stats: TurnStats) -> list[int]:
        """The prompt for the current messages, dropping the oldest turns until it and room for a reply fit."""
        reserve = min(self.max_tokens, self.ctx // 4)
        prompt = self._render()
        while len(prompt) + reserve > self.ctx:
            first = 1 if self.system is not None else 0
            if len(self.messages) - first <= 1:  # only the new message is left
                n = len(prompt)
                self.messages.pop()
                raise LiteError(
                    f"the message needs {n} tokens plus {reserve} for the reply but the context holds {self.ctx}; "
                    "shorten it or raise -c/--ctx-size"
                )
            del self.messages[first]  # the oldest user message, and its reply with it
            if len(self.messages) > first + 1 and self.messages[first]["role"] == "assistant":
                del self.messages[first]
            stats.dropped_turns += 1
            prompt = self._render()
        return prompt

    def _reply(self, before: list[dict[str, str]], notes: list[str] | None = None) -> Iterator[str]:
        """Stream the reply to the current messages. On any error, or a stop before the first token, the
        messages go back to `before` (the cache needs no undo: the next turn re-uses its common prefix)."""
        self._stop = False
        stats = TurnStats(ctx=self.ctx, notes=list(notes or []))
        self.last = stats
        t0 = time.perf_counter()
        try:
            prompt = self._fit(stats)
            if stats.dropped_turns:
                stats.notes.append(f"context full: dropped the oldest {stats.dropped_turns} turn(s)")
            yield from complete(
                self.model, self.session, prompt, self.params, self.generator, self.max_tokens, stats,
                should_stop=lambda: self._stop, prefill_chunk=self.prefill_chunk, t0=t0,
            )  # fmt: skip
        except BaseException:
            self.messages = before
            stats.finish = "error"
            raise
        finally:
            if stats.finish == "error":
                pass
            elif stats.finish == "interrupted" and not stats.token_ids:
                self.messages = before  # stopped before any answer: as if the turn never happened
            else:
                self.messages.append({"role": "assistant", "content": stats.text.strip()})
            if stats.finish == "context":
                stats.notes.append("the reply filled the context; the next turn drops the oldest turns")

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "settings": self.settings(),
            "last": asdict(self.last) if self.last else None,
        }


def complete(
    model: Any,
    session: Any,
    prompt: list[int],
    params: SamplingParams,
    generator: torch.Generator,
    max_tokens: int,
    stats: TurnStats,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    prefill_chunk: int = 128,
    t0: float | None = None,
) -> Generator[str, None, None]:
    """Bring `session` to `prompt` (re-using the prefix it already holds), then sample up to `max_tokens`
    tokens, yielding UTF-8-safe text pieces. Fills `stats` (timings, counts, finish reason, text)."""
    t0 = time.perf_counter() if t0 is None else t0
    hits0, misses0 = cache_counts(model.stats())
    tokenizer = model.tokenizer
    ctx = session.ctx
    if len(prompt) >= ctx:
        raise LiteError(f"the prompt is {len(prompt)} tokens but the context holds {ctx}; raise -c/--ctx-size")
    # keep what the cache already holds, feed the rest (at least the last token, for its logits)
    keep = min(common_prefix(session.tokens, prompt), len(prompt) - 1)
    session.rewind(keep)
    logits = None
    for i in range(keep, len(prompt), prefill_chunk):
        if should_stop():
            logits = None
            break
        logits = session.feed(prompt[i : i + prefill_chunk])
    stats.prompt_tokens = len(session.tokens) - keep
    stats.prompt_len = len(prompt)
    stats.prompt_seconds = time.perf_counter() - t0

    stream = tokenizer.stream()
    ends = getattr(tokenizer, "eog_ids", None) or {tokenizer.eos_id}  # EOS and end-of-turn tokens
    pieces: list[str] = []
    t_first = t_last = None
    try:
        while True:
            if logits is None or should_stop():
                stats.finish = "interrupted"
                break
            tok = sample(logits, params, session.tokens, generator)
            stats.gen_tokens += 1
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
                stats.ttft = t_first - t0
            if tok in ends:
                break
            stats.token_ids.append(tok)
            piece = stream.add(tok)
            if piece:
                pieces.append(piece)
                yield piece
            if len(stats.token_ids) >= max_tokens:
                stats.finish = "length"
                break
            if len(session.tokens) >= ctx:
                stats.finish = "context"
                break
            logits = session.feed([tok])
    finally:
        tail = stream.flush()
        pieces.append(tail)
        stats.text = "".join(pieces)
        stats.gen_seconds = (t_last - t_first) if t_first is not None and t_last is not None else 0.0
        stats.ctx_used = len(session.tokens)
        stats.peak_rss = process_peak_rss()
        device = getattr(model, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            stats.peak_gpu = torch.cuda.max_memory_allocated(device)
        hits1, misses1 = cache_counts(model.stats())
        stats.cache_hits, stats.cache_misses = hits1 - hits0, misses1 - misses0
    if tail:
        yield tail
