"""Sessions (a conversation held in one latent cache) and streaming generation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lite import threads
from lite.cache import LatentCache
from lite.errors import LiteError
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


class Session:
    """`feed` tokens into a latent cache of `ctx` tokens; `rewind(n)` keeps the first n; `reset()` empties it."""

    def __init__(self, model, ctx: int, cache_dtype: torch.dtype | None = None):
        self.model = model
        self.ctx = ctx
        self.tokens: list[int] = []
        self.cache = LatentCache(model.config, ctx, model.device, cache_dtype or model.cache_dtype)

    def feed(self, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Append `ids`; float32 logits [vocab] for the last position, or [len(ids), vocab] with all_logits."""
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


def generate(
    model,
    tokens: Sequence[int],
    max_tokens: int = 256,
    temperature: float = SamplingParams.temperature,
    top_k: int = SamplingParams.top_k,
    top_p: float = SamplingParams.top_p,
    min_p: float = SamplingParams.min_p,
    repeat_penalty: float = SamplingParams.repeat_penalty,
    seed: int | None = None,
    session: Session | None = None,
    stop: Sequence[int] | None = None,
) -> Iterator[int]:
    """Yield up to `max_tokens` sampled token ids after the prompt `tokens`; stops before eos or a `stop` id.

    With `session`, the prompt re-uses the prefix the session already holds (only the rest is prefilled), and
    the session ends holding the prompt and every yielded token except the last (it is fed on the next step).
    The same seed gives the same tokens.
    """
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise LiteError("generate needs a non-empty prompt (at least a BOS token)")
    params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)  # checks each value
    max_tokens = check("max_tokens", max_tokens)
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
    if session is None:
        session = model.session(min(len(tokens) + max_tokens, model.max_context))
    keep = min(common_prefix(session.tokens, tokens), len(tokens) - 1)  # feed at least one token for logits
    session.rewind(keep)
    logits = session.feed(tokens[keep:])
    stops = set(stop or ())
    if model.eos_token_id is not None:
        stops.add(model.eos_token_id)
    stops.update(getattr(getattr(model, "tokenizer", None), "eog_ids", ()))  # end-of-turn tokens (Kimi-K2's <|im_end|>)
    for i in range(max_tokens):
        tok = sample(logits, params, session.tokens, generator)
        if tok in stops:
            return
        yield tok
        if i + 1 == max_tokens or len(session.tokens) >= session.ctx:
            return
        logits = session.feed([tok])
