"""Tiny random DeepSeek-V2 and V3-family checkpoints for tests, written with transformers (the reference)."""

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


YARN_V3 = dict(YARN, mscale=1.0, mscale_all_dim=1.0)  # DeepSeek-V3 / Kimi-K2 use mscale 1.0
V3_ROUTER = dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True)

# DeepseekV3ForCausalLM checkpoints (transformers' DeepseekV3Config); `make_checkpoint` picks the class by name.
V3_CONFIGS: dict[str, dict] = {
    # V3/R1-like: q LoRA, 4 groups keeping 2 (noaux_tc), sigmoid + bias, several dense first layers, YaRN.
    "v3": dict(
        COMMON,
        **V3_ROUTER,
        num_hidden_layers=4,
        first_k_dense_replace=2,
        q_lora_rank=96,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        rope_parameters=dict(YARN_V3),
    ),
    # Moonlight-like: q_proj, one group, plain RoPE.
    "moonlight": dict(
        COMMON,
        **V3_ROUTER,
        q_lora_rank=None,
        n_routed_experts=16,
        num_experts_per_tok=3,
        n_shared_experts=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    ),
    # Kimi-K2-like: many experts, one dense layer, one group, YaRN.
    "kimi": dict(
        COMMON,
        **V3_ROUTER,
        q_lora_rank=96,
        n_routed_experts=48,
        num_experts_per_tok=8,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.827,
        rope_parameters=dict(YARN_V3, rope_theta=50000.0),
    ),
}


def is_v3(kind: str) -> bool:
    return kind in V3_CONFIGS


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
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # comparable to the sigmoid scores' spread: it matters
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def make_checkpoint(out_dir: str | Path, kind: str = "lite", seed: int = 0, **overrides) -> Path:
    """Write a tiny random HF checkpoint (config.json + model.safetensors) to `out_dir`: DeepseekV2ForCausalLM
    for the CONFIGS, DeepseekV3ForCausalLM for the V3_CONFIGS."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    out = Path(out_dir)
    if is_v3(kind):
        model = _build(DeepseekV3Config(**{**V3_CONFIGS[kind], **overrides}), DeepseekV3ForCausalLM, seed)
    else:
        model = _build(DeepseekV2Config(**{**CONFIGS[kind], **overrides}), DeepseekV2ForCausalLM, seed)
    model.save_pretrained(out)
    return out


def _build(cfg, cls, seed: int):
    import torch

    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    randomize_(model, seed)
    return model


def reference_logits(ckpt_dir: str | Path, tokens: list[int]):
    """transformers' float32 logits [T, vocab] for `tokens` (full causal forward)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


FP8_MAX = 448.0  # the largest float8_e4m3fn value


def fp8_quantize(w, block: tuple[int, int] = (128, 128)):
    """w [out, in] float32 -> (e4m3 weight [out, in], float32 weight_scale_inv [ceil(out/b0), ceil(in/b1)],
    the exact dequantized float32 weight), as DeepSeek's FP8 checkpoints store it. The dequantized weight is
    computed here by padding to whole blocks (independently of lite/convert/fp8.py)."""
    import torch

    (o, i), (b0, b1) = w.shape, block
    R, C = -(-o // b0), -(-i // b1)
    padded = torch.zeros(R * b0, C * b1)
    padded[:o, :i] = w
    blocks = padded.view(R, b0, C, b1)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [R, C]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    deq = (q.float() * scale[:, None, :, None]).view(R * b0, C * b1)[:o, :i].contiguous()
    return q.view(R * b0, C * b1)[:o, :i].contiguous(), scale.float(), deq


def is_fp8_weight(name: str, shape) -> bool:
    """The tensors DeepSeek-V3's FP8 release stores in float8: linear weights but the embedding, the output and
    the routers."""
    skip = ("embed_tokens", "lm_head", "mlp.gate.weight", "layernorm", "norm.weight")
    return len(shape) == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def make_fp8_checkpoint(src: str | Path, fp8_dir: str | Path, ref_dir: str | Path, block=(128, 128)) -> None:
    """From an f32 checkpoint `src`: `fp8_dir` with e4m3 weights + weight_scale_inv and a quantization_config, and
    `ref_dir` with the exactly dequantized float32 weights (for transformers, the reference)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src, fp8_dir, ref_dir = Path(src), Path(fp8_dir), Path(ref_dir)
    weights = load_file(str(src / "model.safetensors"))
    fp8, ref = {}, {}
    for name, w in weights.items():
        if is_fp8_weight(name, w.shape):
            q, scale, deq = fp8_quantize(w.float(), block)
            fp8[name], fp8[name + "_scale_inv"], ref[name] = q, scale, deq
        else:
            fp8[name] = ref[name] = w
    for d, tensors in ((fp8_dir, fp8), (ref_dir, ref)):
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(src / "config.json", d / "config.json")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps(cfg, indent=1))
