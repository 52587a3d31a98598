"""A request's way between the event loop and the generation worker: the events the worker emits (`Start`,
`Delta`s, then `Done` or an `ApiError`), the `Job` that carries them across threads, and `StopText`."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

from lite.serve.openai_shapes import GenerationRequest


@dataclass
class Start:
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    finish: str  # "stop", "length" or "cancelled"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""
    ttft: float = 0.0
    decode_tps: float | None = None


class Job:
    """One request on its way through the worker. Created on the event loop that reads its events.

    The worker `emit`s; the loop awaits `next()` (or `batch()`). Each hand-over costs both threads a GIL switch
    and the loop an HTTP write (0.1-0.4 ms on a busy 2-core machine: 10-30% of the demo model's 1 ms decode step),
    so a stream's tokens are handed over at most once per FLUSH_WINDOW: the start, the first token, the end and
    any token after a pause wake the loop at once; while tokens come faster, a timer on the loop collects them
    every FLUSH_WINDOW. Each token is still its own SSE event, sent at most FLUSH_WINDOW after it was sampled.
    """

    FLUSH_WINDOW = 0.02  # s: below 50 tok/s every token is sent the moment it is sampled

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.loop = loop or asyncio.get_running_loop()
        self.cancelled = False
        self._events: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._wake_pending = False  # a wake-up is scheduled or the timer is armed: the loop will look again
        self._timer: asyncio.TimerHandle | None = None
        self._deltas = 0

    def emit(self, event: Any) -> None:
        """From the worker thread: hand `event` to the job's event loop."""
        self._events.append(event)
        urgent = not isinstance(event, Delta) or self._deltas == 0  # the start, the first token, the end
        self._deltas += isinstance(event, Delta)
        if urgent or not self._wake_pending:
            self._wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancelled = True

    def _wake(self) -> None:  # on the loop
        self._ready.set()
        if self._timer is None:
            self._timer = self.loop.call_later(self.FLUSH_WINDOW, self._tick)

    def _tick(self) -> None:  # on the loop, FLUSH_WINDOW after a wake-up
        self._timer = None
        self._wake_pending = False  # first: an event emitted from now on schedules its own wake-up
        if self._events:
            self._wake_pending = True
            self._wake()

    async def batch(self) -> list[Any]:
        """Every event emitted so far and not yet taken (waits for at least one)."""
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    async def next(self) -> Any:
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()


class StopText:
    """Cuts streamed text at the first of the `stop` strings, holding back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buf = ""

    def add(self, piece: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        if not self.stops:
            return piece, False
        self.buf += piece
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
