"""Write a random Hugging Face checkpoint of DeepSeek-V2-Lite's exact shape, with only a few layers.

    python benchmarks/make_v2lite_shaped.py /tmp/v2lite_shaped --layers 4

Shapes and config follow deepseek-ai/DeepSeek-V2-Lite's config.json (hub style: `rope_theta` + `rope_scaling`
{"type": "yarn"}): hidden 2048, 16 heads, q_proj (no q LoRA), kv_lora 512, rope 64, nope 128, v 128, 64 routed
experts of width 1408, top-6, 2 shared experts, the first layer dense (intermediate 10944), vocab 102400.
Weights are bf16, one shard per layer with a model.safetensors.index.json, written one shard at a time so
memory stays at one layer (~1.1 GB). With 4 layers the folder is about 4.3 GB. Nothing here is committed;
write it under /tmp. `--tokenizer` adds the tiny test tokenizer (512 tokens: fine for token-id benchmarks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}


def layer_shapes(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of decoder layer `i`."""
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    p = f"model.layers.{i}."
    s = {
        p + "input_layernorm.weight": (d,),
        p + "post_attention_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (h * (nope + rope), d),
        p + "self_attn.kv_a_proj_with_mqa.weight": (r + rope, d),
        p + "self_attn.kv_a_layernorm.weight": (r,),
        p + "self_attn.kv_b_proj.weight": (h * (nope + v), r),
        p + "self_attn.o_proj.weight": (d, h * v),
    }
    if i < cfg["first_k_dense_replace"]:
        f = cfg["intermediate_size"]
        s |= {p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
        return s
    m, shared = cfg["moe_intermediate_size"], cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
    s[p + "mlp.gate.weight"] = (cfg["n_routed_experts"], d)
    for e in range(cfg["n_routed_experts"]):
        q = f"{p}mlp.experts.{e}."
        s |= {q + "gate_proj.weight": (m, d), q + "up_proj.weight": (m, d), q + "down_proj.weight": (d, m)}
    s |= {
        p + "mlp.shared_experts.gate_proj.weight": (shared, d),
        p + "mlp.shared_experts.up_proj.weight": (shared, d),
        p + "mlp.shared_experts.down_proj.weight": (d, shared),
    }
    return s


def random_weight(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Norms near 1, matrices N(0, 1/fan_in): activations keep their scale through the layers."""
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return (torch.randn(shape, generator=g) / math.sqrt(shape[-1])).to(torch.bfloat16)


def write_checkpoint(out: Path, layers: int = 4, seed: int = 0) -> int:
    """Write config.json, one bf16 shard per layer (plus one for embeddings/head) and the index. Returns bytes."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(V2_LITE, num_hidden_layers=layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(seed)
    d, vocab = cfg["hidden_size"], cfg["vocab_size"]
    groups = [{"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}]
    groups += [layer_shapes(cfg, i) for i in range(layers)]
    n, weight_map, total = len(groups), {}, 0
    for k, shapes in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {name: random_weight(shape, g) for name, shape in shapes.items()}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map |= {name: fname for name in tensors}
        del tensors
        print(f"  wrote {fname} ({(out / fname).stat().st_size / 1e9:.2f} GB)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (under /tmp; never commit it)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (the first is dense); default 4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", action="store_true", help="add the tiny test tokenizer (tests/tiny_tokenizer.py)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    total = write_checkpoint(args.out, args.layers, args.seed)
    if args.tokenizer:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_tokenizer import write_tiny_tokenizer

        write_tiny_tokenizer(args.out)
    print(f"{args.out}: {args.layers} layers, {total / 1e9:.2f} GB of bf16 weights in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
