"""Tiny random DeepSeek-V2 checkpoints for tests, written with transformers (the reference)."""

from __future__ import annotations

import math
from pathlib import Path

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

COMMON = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=384,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    max_position_embeddings=512,
    first_k_dense_replace=1,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
    tie_word_embeddings=False,
)

CONFIGS: dict[str, dict] = {
    # V2-Lite-like: q_proj, greedy top-k, one dense layer, YaRN.
    "lite": dict(
        COMMON,
        q_lora_rank=None,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=2,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_parameters=dict(YARN),
    ),
    # V2-like: q LoRA, group-limited greedy, routed scaling 16, no top-k renormalisation.
    "v2": dict(
        COMMON,
        q_lora_rank=96,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        norm_topk_prob=False,
        routed_scaling_factor=16.0,
        rope_parameters=dict(YARN),
    ),
    # Plain RoPE, normalised top-k.
    "plain": dict(
        COMMON,
        q_lora_rank=None,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        topk_method="greedy",
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}


def randomize_(model, seed: int) -> None:
    """Give every parameter a well-scaled random value so routing and logits are distinct (no ties)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def make_checkpoint(out_dir: str | Path, kind: str = "lite", seed: int = 0, **overrides) -> Path:
    """Write a tiny random HF DeepSeek-V2 checkpoint (config.json + model.safetensors) to `out_dir`."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    out = Path(out_dir)
    cfg = DeepseekV2Config(**{**CONFIGS[kind], **overrides})
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg).float().eval()
    randomize_(model, seed)
    model.save_pretrained(out)
    return out


def reference_logits(ckpt_dir: str | Path, tokens: list[int]):
    """transformers' float32 logits [T, vocab] for `tokens` (full causal forward)."""
    import torch
    from transformers import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM.from_pretrained(str(ckpt_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()
