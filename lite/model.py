"""DeepSeek-V2/V3: multi-head latent attention (MLA) over a latent cache, and DeepSeekMoE. Pure compute, no I/O.

Notation: T new tokens, S = start + T cached tokens, H heads, r = kv_lora_rank, n = qk_nope_head_dim,
p = qk_rope_head_dim, v = v_head_dim, D = r + p (one latent cache row), E routed experts, k experts per token.

Attention uses weight absorption for every chunk: the per-head key up-projection W_UK is folded into the query
(q_lat = W_UKᵀ q_nope), so each head scores the cached latent rows directly, as if all heads shared one key
[c | k_rope] and one value c; W_UV is applied to the attended latent afterwards. The cache is never expanded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lite.cache import LatentCache
from lite.config import ModelArgs
from lite.rope import Rope
from quant.prefill import bucket_rows

Linear = Callable[[torch.Tensor], torch.Tensor]  # y = x @ W.T (a quant.qmatrix.QMatrix)


@dataclass
class AttentionWeights:
    norm: torch.Tensor  # [hidden], the pre-attention RMSNorm
    q_kv_a: Linear  # [q_dim + r + p, hidden]: the query (q_proj, V2-Lite) or its LoRA down-projection (q_a_proj,
    #   V2), fused with kv_a_proj_with_mqa (the latent and the shared rope key): one matmul for both
    q_dim: int  # H·(n+p) with q_proj, q_lora_rank with the LoRA
    q_a_norm: torch.Tensor | None  # [q_lora_rank] (V2)
    q_b: Linear | None  # [H·(n+p), q_lora_rank] (V2)
    kv_a_norm: torch.Tensor  # [r]
    k_b: torch.Tensor  # [H, n, r]: W_UK per head, oriented to absorb into the query
    v_b: torch.Tensor  # [H, r, v]: W_UV per head, oriented to apply to the attended latent
    out: Linear  # [hidden, H·v]


@dataclass
class MLPWeights:
    gate_up: Linear  # [2·ff, hidden]: gate and up fused, one matmul
    down: Linear  # [hidden, ff]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@dataclass
class LayerWeights:
    attn: AttentionWeights
    ffn_norm: torch.Tensor  # [hidden]
    mlp: MLPWeights | None  # dense layers (the first first_k_dense_replace)
    router: torch.Tensor | None  # [E, hidden] float32, MoE layers
    shared: MLPWeights | None  # the shared experts as one MLP of width n_shared·moe_ff, MoE layers
    router_bias: torch.Tensor | None = None  # [E] float32: V3's e_score_correction_bias (selection only)


@dataclass
class Weights:
    embed: Callable[[torch.Tensor], torch.Tensor]  # token ids [T] -> [T, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    output: Linear  # [vocab, hidden]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps=eps)  # one fused op
    # half precision: normalise in float32, scale in x's dtype (as DeepSeek's reference does)
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype) * weight


def gate_probs(args: ModelArgs, router: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gate of x [T, hidden] -> [T, E] float32: softmax (V2) or sigmoid (V3) of the fp32 router logits.
    The routed experts' weights are taken from these."""
    logits = x.float() @ router.T  # [T, E], an fp32 gate
    return logits.sigmoid() if args.scoring_func == "sigmoid" else torch.softmax(logits, dim=-1)


def select_scores(args: ModelArgs, probs: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the router ranks experts by [T, E]: probs [T, E] plus the selection-only bias (V3's
    e_score_correction_bias [E]), -inf outside the groups group-limited routing keeps.

    Groups: V2's group_limited_greedy keeps the topk_group groups with the best single expert, V3's noaux_tc
    those with the best sum of their top-2 experts (of the biased scores)."""
    scores = probs if bias is None else probs + bias  # [T, E]
    if args.n_group > 1 and args.topk_group < args.n_group and args.topk_method != "greedy":
        groups = scores.view(scores.shape[0], args.n_group, -1)  # [T, G, E/G]
        if args.topk_method == "noaux_tc":
            rank = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            rank = groups.amax(dim=-1)  # [T, G]
        best = rank.topk(args.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
        scores = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    return scores


def gate_scores(
    args: ModelArgs, router: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The router's ranking of experts for x [T, hidden] -> [T, E] float32 (the top-k of it are selected)."""
    return select_scores(args, gate_probs(args, router, x), bias)


def route(
    args: ModelArgs, router: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of x [T, hidden]: ids [T, k] int64 and weights [T, k] float32 (normalised, scaled).

    The ids are the top-k of `select_scores`; the weights are the unbiased gate values of those experts, divided by
    their sum if `norm_topk_prob`, times `routed_scaling_factor` (DeepSeek's and llama.cpp's order)."""
    probs = gate_probs(args, router, x)  # [T, E]
    ids = select_scores(args, probs, bias).topk(args.num_experts_per_tok, dim=-1).indices  # [T, k]
    weights = probs.gather(1, ids)  # [T, k]
    if args.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * args.routed_scaling_factor


SCORE_BUDGET = 1 << 25  # score elements per block of queries (128 MB in float32): bounds long-prefill memory
CAUSAL_BLOCK = 128  # queries per block at most (see attend)
# Values of expanded keys and values at most (256 MiB in bf16): ~26K cached rows for V2-Lite (16 heads), ~3.3K for
# V2 (128 heads); a longer cache is attended through the latent rows, which need no copy.
EXPAND_BUDGET = 1 << 27


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of query [H, T, Dk] (at positions start..start+T) over the first S = start+T rows of keys /
    values: [S, D] shared by all heads (the latent rows: one plain matmul per block), or [H, S', D] per head with
    S' >= S (rows past S are never seen). Returns [H, T, Dv]."""
    H, T, _ = query.shape
    S = start + T
    shared = keys.dim() == 2
    # queries per block: within the score budget, and at most CAUSAL_BLOCK so that a long prefill skips the rows
    # no query of a block may see (about half the work of a prompt's causal triangle)
    block = max(1, min(SCORE_BUDGET // (H * S), CAUSAL_BLOCK))
    out = []
    for t0 in range(0, T, block):
        q = query[:, t0 : t0 + block]  # [H, t, Dk]
        t = q.shape[1]
        seen = start + t0 + t  # rows 0..seen-1: the last query of the block sees them all
        if shared:
            scores = (q.reshape(H * t, -1) @ keys[:seen].T).view(H, t, seen)
        else:
            # per head: a few bmm shapes only (oneDNN keeps ~1 MiB per shape it meets, for the life of the process):
            # queries padded to `bucket_rows`, rows to `bucket_rows` within the given S' (the padding is masked)
            tb, seen = bucket_rows(t), min(bucket_rows(seen), keys.shape[1])
            q = F.pad(q, (0, 0, 0, tb - t)) if tb != t else q
            scores = torch.bmm(q, keys[:, :seen].transpose(1, 2))  # [H, tb, seen]
        if scores.shape[1] > 1 or seen > start + t0 + t:  # causal: query t0+i sees rows 0..start+t0+i
            rows = torch.arange(seen, device=keys.device)
            future = rows[None, :] > (start + t0 + torch.arange(scores.shape[1], device=keys.device))[:, None]
            scores.masked_fill_(future, float("-inf"))  # in place: a fresh tensor, one pass fewer
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)  # [H, t, seen], float32 inside
        if shared:
            out.append((probs.view(H * t, seen) @ values[:seen]).view(H, t, -1))
        else:
            out.append(torch.bmm(probs, values[:, :seen])[:, :t])
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def expand_heads(args: ModelArgs, T: int, start: int) -> bool:
    """Whether attention for T new queries after `start` cached rows costs less with the latent rows expanded into
    per-head keys and values (as transformers computes it) than with W_UK/W_UV absorbed into queries and outputs.

    Multiply-adds per head, S = start + T rows, each query seeing ~start + T/2 of them: expanding costs
    S·r·(n + v) + T·(start + T/2)·(n + p + v); absorbing T·r·(n + v) + T·(start + T/2)·(2r + p). A prompt (T in
    the hundreds) expands; decode (T = 1) over a long cache absorbs, and so does any chunk whose expanded rows would
    exceed EXPAND_BUDGET values."""
    n, v, p, r = args.qk_nope_head_dim, args.v_head_dim, args.qk_rope_head_dim, args.kv_lora_rank
    if args.num_attention_heads * (start + T) * (n + p + v) > EXPAND_BUDGET:  # the expanded rows must stay small
        return False
    seen = start + T / 2
    return (start + T) * r * (n + v) + T * seen * (n + p + v) < T * r * (n + v) + T * seen * (2 * r + p)


class Transformer:
    """forward(tokens, cache, start) -> logits. `experts(layer, x, ids, weights)` computes the routed sum."""

    def __init__(self, args: ModelArgs, weights: Weights, experts, device: torch.device | str, dtype: torch.dtype):
        self.args, self.weights, self.experts = args, weights, experts
        self.device, self.dtype = torch.device(device), dtype
        self.rope = Rope(args, device)
        self.scale = args.softmax_scale()

    def attention(self, layer: int, x: torch.Tensor, cache: LatentCache, start: int) -> torch.Tensor:
        """x [T, hidden] (normed) -> [T, hidden]; writes the T new latent rows into the cache."""
        a, args = self.weights.layers[layer].attn, self.args
        T, H = x.shape[0], args.num_attention_heads
        n, p, r, v = args.qk_nope_head_dim, args.qk_rope_head_dim, args.kv_lora_rank, args.v_head_dim
        eps = args.rms_norm_eps

        q, c, k_rope = a.q_kv_a(x).split([a.q_dim, r, p], dim=-1)  # [T, q_dim], [T, r], [T, p]
        if a.q_b is not None:
            assert a.q_a_norm is not None  # q LoRA: q_a_norm comes with q_b
            q = a.q_b(rms_norm(q, a.q_a_norm, eps))  # [T, q_lora] -> [T, H·(n+p)]
        q_nope, q_rope = q.reshape(T, H, n + p).split([n, p], dim=-1)  # [T, H, n], [T, H, p]

        cis = self.rope.rotations(start, T)  # [T, p/2]
        latent = torch.cat([rms_norm(c, a.kv_a_norm, eps), Rope.rotate(k_rope, cis)], dim=-1)  # [T, D]
        kv = cache.write(layer, start, latent.to(cache.dtype))  # [S, D]: every cached row, a view

        q_rope = Rope.rotate(q_rope, cis).transpose(0, 1)  # [H, T, p]
        if expand_heads(args, T, start):
            # keys [H, S', n + p] and values [H, S', v] from every cached row (S' = bucket_rows(S): few GEMM shapes,
            # zero rows past S): two GEMMs in the cache's dtype. W_UK / W_UV are laid out for them per chunk, not
            # kept: a second copy of them would hold ~2 GiB for V2 (60 layers of 128 heads)
            S, dt = kv.shape[0], kv.dtype
            rows = F.pad(kv, (0, 0, 0, bucket_rows(S) - S))  # [S', D]
            c = rows[:, :r]  # [S', r]
            k_nope = (c @ a.k_b.reshape(H * n, r).to(dt).T).view(-1, H, n).transpose(0, 1)  # [H, S', n]
            keys = torch.cat([k_nope, rows[None, :, r:].expand(H, -1, p)], dim=-1)  # [H, S', n + p]
            w_uv = a.v_b.transpose(1, 2).reshape(H * v, r).to(dt)  # [H·v, r]
            values = (c @ w_uv.T).view(-1, H, v).transpose(0, 1).contiguous()  # [H, S', v]
            query = (torch.cat([q_nope.transpose(0, 1), q_rope], dim=-1) * self.scale).to(dt)  # [H, T, n + p]
            o = attend(query, keys, values, start).to(x.dtype)  # [H, T, v]
        else:
            q_lat = torch.bmm(q_nope.transpose(0, 1), a.k_b)  # [H, T, n] @ [H, n, r] -> [H, T, r]
            query = (torch.cat([q_lat, q_rope], dim=-1) * self.scale).to(kv.dtype)  # [H, T, D]
            o_lat = attend(query, kv, kv[:, :r], start).to(x.dtype)  # [H, T, r]
            o = torch.bmm(o_lat, a.v_b)  # [H, T, r] @ [H, r, v] -> [H, T, v]
        return a.out(o.transpose(0, 1).reshape(T, -1))  # [T, H·v] -> [T, hidden]

    def ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (normed) -> [T, hidden]: a dense MLP, or shared experts + routed experts."""
        w = self.weights.layers[layer]
        if w.mlp is not None:
            return w.mlp(x)
        assert w.router is not None  # a MoE layer
        ids, weights = route(self.args, w.router, x, w.router_bias)
        out = self.experts(layer, x, ids, weights)
        if w.shared is not None:
            out = out + w.shared(x)  # shared experts are added unweighted
        return out

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: LatentCache, start: int, all_logits: bool = True) -> torch.Tensor:
        """tokens [T] at positions start..start+T -> float32 logits [T, vocab] (or [1, vocab] for the last)."""
        eps, on_residual = self.args.rms_norm_eps, self.experts.on_residual
        h = self.weights.embed(tokens).to(self.dtype)  # [T, hidden] on the device (ids may stay on the CPU)
        for i, w in enumerate(self.weights.layers):
            h = h + self.attention(i, rms_norm(h, w.attn.norm, eps), cache, start)
            h = h + self.ffn(i, rms_norm(h, w.ffn_norm, eps))
            on_residual(i, h)  # the input of layer i+1: lets the backend prefetch its experts
        if not all_logits:
            h = h[-1:]
        return self.weights.output(rms_norm(h, self.weights.norm, eps)).float()
