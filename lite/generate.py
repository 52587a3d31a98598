"""Sessions (a conversation held in one latent cache) and the one streaming generation loop.

`stream_generate` is the only place that prefills a prompt (re-using the prefix a session holds), samples,
decides which token ends a reply (`end_ids`) and measures it all; `Model.generate`, `Chat`, `lite run`,
`lite bench` and `lite serve` are built on it (mlx-lm's `stream_generate` is the model).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from lite import threads
from lite.cache import LatentCache
from lite.errors import ContextTooSmall, LiteError
from lite.sampling import SamplingParams, check, sample

PREFILL_CHUNK = 256  # tokens per forward when every position's logits are wanted (float32 [T, vocab] each)
# Activation memory one prefill forward may use. A prompt goes through the layers in chunks as large as this
# allows (attention tiles its [H, T, S] scores itself), so each layer fetches each expert it needs once per chunk:
# with experts offloaded, small chunks would move the same experts over PCIe again and again.
ACTIVATION_BUDGET = 1 << 30
MAX_PREFILL_CHUNK = 8192


def prefill_chunk(args, dtype_bytes: int, all_logits: bool) -> int:
    """Tokens per prefill forward: what ACTIVATION_BUDGET holds of one layer's live activations per token."""
    if all_logits:
        return PREFILL_CHUNK
    H, r, p = args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim
    per_token = (
        6 * args.hidden_size  # residual, normed input, attention and ffn outputs
        + 2 * H * (args.qk_nope_head_dim + p)  # q, split and rotated
        + 3 * H * (r + p)  # q_lat, the absorbed query, the attended latent
        + H * args.v_head_dim
        + 3 * args.num_experts_per_tok * args.moe_intermediate_size  # routed rows: gate, up, SwiGLU
        + 3 * max(args.intermediate_size, args.moe_intermediate_size * max(args.n_shared_experts or 1, 1))
    ) * dtype_bytes
    return max(PREFILL_CHUNK, min(MAX_PREFILL_CHUNK, ACTIVATION_BUDGET // per_token))


class Stopped(Exception):
    """`Session.feed` was asked to stop (its `should_stop`) between two prefill chunks; the session holds the
    chunks fed before it."""


class Session:
    """`feed` tokens into a latent cache of `ctx` tokens; `rewind(n)` keeps the first n; `reset()` empties it."""

    def __init__(self, model, ctx: int, cache_dtype: torch.dtype | None = None):
        self.model = model
        self.ctx = ctx
        self.tokens: list[int] = []
        self.cache = LatentCache(model.config, ctx, model.device, cache_dtype or model.cache_dtype)

    def feed(
        self, ids: Sequence[int], all_logits: bool = False, should_stop: Callable[[], bool] | None = None
    ) -> torch.Tensor:
        """Append `ids`; float32 logits [vocab] for the last position, or [len(ids), vocab] with all_logits.

        A long input goes through in chunks (`prefill_chunk`); `should_stop` is asked before each one and, when
        it says so, `Stopped` is raised (a Ctrl+C during a long prefill keeps what was fed so far)."""
        ids = [int(t) for t in ids]
        if not ids:
            raise LiteError("nothing to feed: pass at least one token id")
        if len(self.tokens) + len(ids) > self.ctx:
            raise LiteError(
                f"context full: {len(self.tokens)} + {len(ids)} tokens exceed ctx={self.ctx}; "
                "rewind or reset the session, or open one with a larger ctx"
            )
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise LiteError(f"token id out of range 0..{vocab - 1}: {max(ids) if max(ids) >= vocab else min(ids)}")
        threads.tick()  # the thread count follows the free cores, when `lite.threads.auto()` is on
        outs = []
        step = prefill_chunk(self.model.config, self.model.dtype.itemsize, all_logits)
        for i in range(0, len(ids), step):
            if should_stop is not None and should_stop():
                raise Stopped
            chunk = ids[i : i + step]
            last = i + step >= len(ids)
            start = len(self.tokens)
            tokens = torch.tensor(chunk, dtype=torch.long)
            logits = self.model.transformer.forward(tokens, self.cache, start, all_logits=all_logits)
            if (all_logits or last) and not bool(torch.isfinite(logits).all()):
                raise LiteError(
                    f"the model produced NaN or Inf logits at position {start + len(chunk) - 1}: a weight holds NaN or "
                    "Inf (lite checks large weights at load only by sampling rows) or the computation overflowed"
                )
            self.tokens.extend(chunk)
            if all_logits or last:
                outs.append(logits)
        return torch.cat(outs) if all_logits else outs[-1][-1]

    def rewind(self, n: int) -> None:
        """Keep only the first `n` tokens (later cache rows are simply overwritten by the next feed)."""
        if not 0 <= n <= len(self.tokens):
            raise LiteError(f"cannot rewind to {n}: the session holds {len(self.tokens)} tokens")
        del self.tokens[n:]

    def reset(self) -> None:
        self.tokens.clear()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def end_ids(model: Any) -> frozenset[int]:
    """The token ids that end a reply; every loop asks here. The model's end-of-sequence id (a lite `Model`
    sets `eos_token_id` from its GGUF; None turns it off; other models: their tokenizer's `eos_id`), plus the
    end-of-turn id a GGUF may name (llama.cpp's `tokenizer.ggml.eot_token_id`; DeepSeek's chat template ends a
    turn with the end-of-sequence token itself) and the tokenizer's end-of-generation ids (`eog_ids`)."""
    if hasattr(model, "eos_token_id"):
        eos = model.eos_token_id
    else:
        eos = getattr(getattr(model, "tokenizer", None), "eos_id", None)
    if eos is None:
        return frozenset()
    metadata = getattr(model, "metadata", None) or {}
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    # and the tokenizer's end-of-generation tokens (Kimi-K2 ends a turn with <|im_end|>, not its [EOS])
    # (less the tokenizer's own EOS, which the model's eos_token_id overrides)
    tokenizer = getattr(model, "tokenizer", None)
    eog = set(getattr(tokenizer, "eog_ids", None) or ()) - {getattr(tokenizer, "eos_id", None)}
    return frozenset(int(t) for t in (eos, eot, *eog) if t is not None)


_peak_seen = 0
_process: Any = None


def process_peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes; it never goes down. The kernel's high-water mark
    (getrusage; updated lazily) combined with every RSS this function has seen."""
    global _peak_seen, _process
    if _process is None:
        _process = psutil.Process()
    current = _process.memory_info().rss
    try:
        import resource

        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        kernel = kernel if sys.platform == "darwin" else kernel * 1024
    except ImportError:  # Windows
        kernel = 0
    _peak_seen = max(_peak_seen, current, kernel)
    return _peak_seen


def cache_counts(stats: Any) -> tuple[int, int]:
    """(hits, misses) of the expert cache from `model.stats()`; (0, 0) when the backend keeps no stats."""
    total = stats.get("total", stats) if isinstance(stats, dict) else {}
    return int(total.get("hits", 0) or 0), int(total.get("misses", 0) or 0)


@dataclass(frozen=True)
class GenerationResponse:
    """One record per sampled token (`stream_generate`). `finish_reason` is None until the last record:
    "stop" (an end token: `token` is that id and is not part of the reply), "length" (max_tokens), "context"
    (the session is full) or "interrupted" (`should_stop`; `token` is None: nothing was sampled)."""

    token: int | None
    text: str  # the whole characters this token completes (UTF-8 safe; may be ""); the last adds the tail
    prompt_tokens: int  # prompt tokens prefilled (the prefix the session already held is not counted)
    prompt_len: int  # the whole prompt
    prompt_seconds: float  # from the start to the end of the prefill
    generation_tokens: int  # tokens sampled so far, an end token included
    generation_seconds: float  # from the first sampled token to this one
    ttft: float  # from the start to the first sampled token (0 before it)
    ctx_used: int  # tokens in the session
    cache_hits: int  # expert-cache hits and misses since the start
    cache_misses: int
    peak_rss: int  # the process's peak resident memory so far (`process_peak_rss`)
    peak_gpu: int  # peak CUDA memory torch allocated since the process started (0 on CPU)
    finish_reason: str | None = None

    @property
    def prompt_tps(self) -> float | None:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 and self.prompt_tokens else None

    @property
    def generation_tps(self) -> float | None:
        """Tokens after the first over the time since the first (the first one's time is the prefill's)."""
        n, s = self.generation_tokens, self.generation_seconds
        return (n - 1) / s if n > 1 and s > 0 else None


def _never() -> bool:
    return False


def stream_generate(
    model: Any,
    prompt: Sequence[int],
    params: SamplingParams | None = None,
    *,
    max_tokens: int = 256,
    session: Any = None,
    generator: torch.Generator | None = None,
    stop: Collection[int] = (),
    ignore_eos: bool = False,
    should_stop: Callable[[], bool] = _never,
    t0: float | None = None,
) -> Iterator[GenerationResponse]:
    """Bring `session` to `prompt` (re-using the prefix it already holds, feeding at least the last token for
    its logits), then sample up to `max_tokens` tokens, one `GenerationResponse` each.

    A token in `end_ids(model)` (unless `ignore_eos`) or in `stop` ends the reply. `should_stop` is asked between
    prefill chunks and before each token. The session ends holding the prompt and every token but the last.
    Without `session`, one just large enough (up to the model's context) is opened; without `generator`, one
    seeded with `params.seed` (or a random seed). `t0` (default: now) is when the request started, for TTFT.
    """
    t0 = time.perf_counter() if t0 is None else t0
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise LiteError("generate needs a non-empty prompt (at least a BOS token)")
    params = params if params is not None else SamplingParams()
    max_tokens = check("max_tokens", max_tokens)
    if generator is None:
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))
        generator = torch.Generator().manual_seed(seed)
    if session is None:
        session = model.session(min(len(prompt) + max_tokens, model.max_context))
    ctx = session.ctx
    if len(prompt) > ctx:
        raise ContextTooSmall(f"the prompt is {len(prompt)} tokens but the context holds {ctx}; use a larger context")
    ends = set(stop) | (set() if ignore_eos else end_ids(model))
    tokenizer = getattr(model, "tokenizer", None)
    decoder = tokenizer.stream() if tokenizer is not None else None
    device = getattr(model, "device", None)
    cuda = isinstance(device, torch.device) and device.type == "cuda"
    hits0, misses0 = cache_counts(model.stats())

    keep = min(common_prefix(session.tokens, prompt), len(prompt) - 1)
    session.rewind(keep)
    logits: torch.Tensor | None
    try:
        logits = session.feed(prompt[keep:], should_stop=should_stop)
    except Stopped:
        logits = None
    prompt_tokens = len(session.tokens) - keep
    prompt_seconds = time.perf_counter() - t0
    n = 0
    t_first = t_last = 0.0

    def record(token: int | None, text: str, finish: str | None) -> GenerationResponse:
        hits, misses = cache_counts(model.stats())
        return GenerationResponse(
            token, text, prompt_tokens, len(prompt), prompt_seconds, n, t_last - t_first,
            t_first - t0 if n else 0.0, len(session.tokens), hits - hits0, misses - misses0,
            process_peak_rss(), torch.cuda.max_memory_allocated(device) if cuda else 0, finish,
        )  # fmt: skip

    def tail() -> str:
        return decoder.flush() if decoder is not None else ""

    while True:
        if logits is None or should_stop():
            yield record(None, tail(), "interrupted")
            return
        tok = sample(logits, params, session.tokens, generator)
        n += 1
        t_last = time.perf_counter()
        if n == 1:
            t_first = t_last
        if tok in ends:
            yield record(tok, tail(), "stop")
            return
        text = decoder.add(tok) if decoder is not None else ""
        finish = "length" if n >= max_tokens else "context" if len(session.tokens) >= ctx else None
        yield record(tok, text + tail() if finish else text, finish)
        if finish:
            return
        logits = session.feed([tok])


def generate(
    model: Any,
    tokens: Sequence[int],
    max_tokens: int = 256,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repeat_penalty: float | None = None,
    seed: int | None = None,
    session: Session | None = None,
    stop: Sequence[int] | None = None,
) -> Iterator[int]:
    """Yield up to `max_tokens` sampled token ids after the prompt `tokens`; stops before an end token
    (`end_ids`) or a `stop` id. Sampling options left out (None) take the model's recommended values (its GGUF's
    `general.sampling.*`), else `SamplingParams`' defaults.

    With `session`, the prompt re-uses the prefix the session already holds (only the rest is prefilled), and
    the session ends holding the prompt and every yielded token except the last (it is fed on the next step).
    The same seed gives the same tokens.
    """
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty)
    params = SamplingParams.from_metadata(
        getattr(model, "metadata", None), seed=seed, **{k: v for k, v in given.items() if v is not None}
    )
    for r in stream_generate(model, tokens, params, max_tokens=max_tokens, session=session, stop=stop or ()):
        if r.token is not None and r.finish_reason != "stop":
            yield r.token
