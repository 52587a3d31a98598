"""DeepSeek-V2: multi-head latent attention (MLA) over a latent cache, and DeepSeekMoE. Pure compute, no I/O.

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


def gate_scores(args: ModelArgs, router: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The softmax gate of x [T, hidden] -> [T, E] float32, zero outside the groups group-limited routing keeps."""
    scores = torch.softmax(x.float() @ router.T, dim=-1)  # [T, E], an fp32 gate
    if args.topk_method == "group_limited_greedy" and args.n_group > 1:
        # keep the topk_group groups with the best single expert, then pick top-k inside them
        groups = scores.view(scores.shape[0], args.n_group, -1)  # [T, G, E/G]
        best = groups.amax(dim=-1).topk(args.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)  # [T, G]
        scores = groups.masked_fill(~keep[..., None], 0.0).flatten(1)
    return scores


def route(args: ModelArgs, router: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of x [T, hidden]: ids [T, k] int64 and weights [T, k] float32 (normalised, scaled)."""
    weights, ids = gate_scores(args, router, x).topk(args.num_experts_per_tok, dim=-1)  # [T, k]
    if args.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * args.routed_scaling_factor


SCORE_BUDGET = 1 << 25  # score elements per block of queries (128 MB in float32): bounds long-prefill memory


def attend_latent(query: torch.Tensor, kv: torch.Tensor, start: int, r: int) -> torch.Tensor:
    """Causal attention of query [H, T, D] (at positions start..start+T) over latent rows kv [S, D], S = start+T.

    All heads share one key (the whole row [c | k_rope]) and one value (c = its first r values), so each block
    is two plain matmuls over the cache. Returns the attended latent [H, T, r].
    """
    H, T, _ = query.shape
    S = kv.shape[0]
    block = max(1, SCORE_BUDGET // (H * S))  # queries per block
    out = []
    for t0 in range(0, T, block):
        q = query[:, t0 : t0 + block]  # [H, t, D]
        t = q.shape[1]
        scores = (q.reshape(H * t, -1) @ kv.T).view(H, t, S)
        if T > 1:  # causal: query t0+i sees rows 0..start+t0+i
            rows = torch.arange(S, device=kv.device)
            future = rows[None, :] > (start + t0 + torch.arange(t, device=kv.device))[:, None]  # [t, S]
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(kv.dtype)  # [H, t, S]
        out.append((probs.view(H * t, S) @ kv[:, :r]).view(H, t, r))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


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
        n, p, r = args.qk_nope_head_dim, args.qk_rope_head_dim, args.kv_lora_rank
        eps = args.rms_norm_eps

        q, c, k_rope = a.q_kv_a(x).split([a.q_dim, r, p], dim=-1)  # [T, q_dim], [T, r], [T, p]
        if a.q_b is not None:
            q = a.q_b(rms_norm(q, a.q_a_norm, eps))  # [T, q_lora] -> [T, H·(n+p)]
        q_nope, q_rope = q.reshape(T, H, n + p).split([n, p], dim=-1)  # [T, H, n], [T, H, p]

        cis = self.rope.rotations(start, T)  # [T, p/2]
        latent = torch.cat([rms_norm(c, a.kv_a_norm, eps), Rope.rotate(k_rope, cis)], dim=-1)  # [T, D]
        kv = cache.write(layer, start, latent.to(cache.dtype))  # [S, D]: every cached row, a view

        q_lat = torch.bmm(q_nope.transpose(0, 1), a.k_b)  # [H, T, n] @ [H, n, r] -> [H, T, r]
        q_rope = Rope.rotate(q_rope, cis).transpose(0, 1)  # [H, T, p]
        query = (torch.cat([q_lat, q_rope], dim=-1) * self.scale).to(kv.dtype)  # [H, T, D]

        o_lat = attend_latent(query, kv, start, r).to(x.dtype)  # [H, T, r]
        o = torch.bmm(o_lat, a.v_b)  # [H, T, r] @ [H, r, v] -> [H, T, v]
        return a.out(o.transpose(0, 1).reshape(T, -1))  # [T, H·v] -> [T, hidden]

    def ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (normed) -> [T, hidden]: a dense MLP, or shared experts + routed experts."""
        w = self.weights.layers[layer]
        if w.mlp is not None:
            return w.mlp(x)
        ids, weights = route(self.args, w.router, x)
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
