"""Routing traces: per forward call and MoE layer, the experts each token selected and the ones the router
predicted one layer ahead. JSON lines, replayed by benchmarks/cache_sim.py.

Format: the first line is {"meta": {"layers": [...], "n_experts": N, "top_k": k}}; then one line per MoE-layer
call: {"step": s, "layer": L, "selected": [[e, ...] per token], "predicted": [[e, ...] per token] | null}.
`predicted` for layer L is the gate of L applied to the residual stream leaving layer L-1
(`predict(L, h, width)`): each token's PREDICTED_WIDTH likeliest experts, likeliest first, i.e. what a
lookahead-1 prefetcher sees (it takes as many as a layer has slots); null for the first layer and when the
backend has no `predict`.

Use: `rec = TraceRecorder("out.jsonl"); with rec.attached(model): model.generate(...)`, or wrap a backend
directly with `rec.wrap(backend)`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

PREDICTED_WIDTH = 32  # experts recorded per token and prediction: enough for caches of up to 32 per layer


class TracingBackend:
    """An ExpertBackend that records routing and delegates everything to `inner`."""

    def __init__(self, inner: Any, recorder: TraceRecorder, predict: Callable | None):
        self.inner = inner
        self.recorder = recorder
        self.predict = predict
        self.moe_layers: list[int] | None = getattr(inner, "layers", None)
        self.predicted: dict[int, list[list[int]]] = {}

    def on_residual(self, layer: int, h: torch.Tensor) -> None:
        if self.predict is not None:
            target = self._next_moe_layer(layer)
            if target is not None:
                self.predicted[target] = self.predict(target, h, PREDICTED_WIDTH).tolist()
        self.inner.on_residual(layer, h)

    def _next_moe_layer(self, layer: int) -> int | None:
        if self.moe_layers is None:
            return layer + 1
        return next((m for m in self.moe_layers if m == layer + 1), None)

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.recorder.record(layer, ids.tolist(), self.predicted.pop(layer, None))
        return self.inner(layer, x, ids, weights)

    def __getattr__(self, name: str) -> Any:  # stats(), reset_stats(), close() ...
        return getattr(self.inner, name)


class TraceRecorder:
    """Writes a routing trace as JSON lines. `step` counts forward passes (it advances when a layer repeats)."""

    def __init__(self, path: str | Path, meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.file = self.path.open("w")
        self.meta_written = False
        self.meta = dict(meta or {})
        self.step = 0
        self.last_layer = -1
        self.lines = 0

    def wrap(self, backend: Any, predict: Callable | None = None) -> TracingBackend:
        predict = predict if predict is not None else getattr(backend, "predict", None)
        if "layers" not in self.meta and hasattr(backend, "layers"):
            self.meta["layers"] = list(backend.layers)
        if "n_experts" not in self.meta and hasattr(backend, "n_experts"):
            self.meta["n_experts"] = backend.n_experts
        return TracingBackend(backend, self, predict)

    @contextlib.contextmanager
    def attached(self, model: Any, attr: str | None = None) -> Iterator[TraceRecorder]:
        """Swap the model's expert backend for a tracing wrapper while the block runs."""
        owner, name = find_backend(model, attr)
        inner = getattr(owner, name)
        setattr(owner, name, self.wrap(inner))
        try:
            yield self
        finally:
            setattr(owner, name, inner)
            self.file.flush()

    def record(self, layer: int, selected: list[list[int]], predicted: list[list[int]] | None) -> None:
        if not self.meta_written:
            if selected:
                self.meta.setdefault("top_k", len(selected[0]))
            self.file.write(json.dumps({"meta": self.meta}) + "\n")
            self.meta_written = True
        if layer <= self.last_layer:
            self.step += 1
        self.last_layer = layer
        self.file.write(json.dumps({"step": self.step, "layer": layer, "selected": selected, "predicted": predicted}))
        self.file.write("\n")
        self.lines += 1

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_backend(model: Any, attr: str | None = None) -> tuple[Any, str]:
    """(object, attribute name) holding the model's expert backend: `attr` if given, else the first of a few
    likely places (`model.transformer.experts`, which lite's Model calls, then `model.experts`)."""
    candidates = [attr] if attr else ["transformer.experts", "experts", "model.experts", "backend"]
    for path in candidates:
        *parents, name = path.split(".")
        owner = model
        for p in parents:
            owner = getattr(owner, p, None)
        if owner is not None and callable(getattr(owner, name, None)) and hasattr(getattr(owner, name), "on_residual"):
            return owner, name
    raise AttributeError(f"cannot find the expert backend of {type(model).__name__}; pass attr=")


def read_trace(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, calls) from a trace file."""
    meta: dict[str, Any] = {}
    calls = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            if "meta" in obj:
                meta = obj["meta"]
            else:
                calls.append(obj)
    return meta, calls
