"""A chat conversation as a library: messages, templating, one latent cache, streaming replies.

The conversation lives in one `Session`. Each turn renders the whole conversation with the model's chat
template, keeps the longest common prefix already in the cache and feeds only the rest, so a new turn
prefills just its new tokens. /regen rewinds to the end of the prompt; a conversation that would not fit
the context drops its oldest turns (and reports it), never truncating silently.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lite.errors import ContextTooSmall, LiteError
from lite.generate import GenerationResponse, common_prefix, process_peak_rss, stream_generate
from lite.sampling import SamplingParams, check
from lite.text import replaced_note, scrub

__all__ = ["Chat", "TurnStats", "process_peak_rss", "render_prompt"]

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

    def add(self, r: GenerationResponse) -> None:
        """Take in one record of `stream_generate`: its token and text, and the figures so far."""
        if r.token is not None and r.finish_reason != "stop":  # an end token is not part of the reply
            self.token_ids.append(r.token)
        self.text += r.text
        self.prompt_tokens, self.prompt_len, self.prompt_seconds = r.prompt_tokens, r.prompt_len, r.prompt_seconds
        self.gen_tokens, self.gen_seconds, self.ttft = r.generation_tokens, r.generation_seconds, r.ttft
        self.ctx_used, self.cache_hits, self.cache_misses = r.ctx_used, r.cache_hits, r.cache_misses
        self.peak_rss, self.peak_gpu = r.peak_rss, r.peak_gpu
        self.finish = r.finish_reason or self.finish

    def texts(self, records: Iterable[GenerationResponse]) -> Generator[str, None, None]:
        """The records' non-empty text pieces, taking each record in (`add`) as it passes."""
        for r in records:
            self.add(r)
            if r.text:
                yield r.text


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
    ):
        if getattr(model, "tokenizer", None) is None:
            raise LiteError("this model file has no tokenizer; convert it from a folder with tokenizer.json")
        self.model = model
        self.tokenizer = model.tokenizer
        self.session = model.session(ctx)
        self.params = params or SamplingParams.from_metadata(getattr(model, "metadata", None))
        self.max_tokens = check("max_tokens", max_tokens)
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
                raise ContextTooSmall(
                    f"the message needs {n} tokens plus {reserve} for the reply but the context holds {self.ctx}; "
                    "shorten it or use a larger context"
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
            yield from stats.texts(
                stream_generate(
                    self.model,
                    prompt,
                    self.params,
                    max_tokens=self.max_tokens,
                    session=self.session,
                    generator=self.generator,
                    should_stop=lambda: self._stop,
                    t0=t0,
                )  # fmt: skip
            )
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
