"""Decode-step time of one DeepSeek-V2-Lite-shaped MLA layer: lite's absorbed latent path vs transformers.

transformers' `DeepseekV2Attention` caches the latent too, but re-expands the whole cache through kv_b_proj
into per-head keys and values on every step; lite folds W_UK into the query and attends over the latent rows.

    python benchmarks/bench_attention.py [--threads 2] [--contexts 1024 8192 32768] [--steps 5] [--device cuda]

Both sides use float32 on CPU and bf16 on CUDA; the timings are the best of --steps steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from lite.cache import LatentCache
from lite.config import ModelArgs
from lite.model import AttentionWeights, LayerWeights, Transformer, Weights
from quant.qmatrix import QMatrix

LITE = dict(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=1,
    num_attention_heads=16,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_shared_experts=2,
    first_k_dense_replace=1,
    max_position_embeddings=163840,
)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
            beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)  # fmt: skip


def hf_attention(args_hf: dict, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention

    cfg = DeepseekV2Config(**args_hf, rope_parameters=YARN, num_key_value_heads=16)
    cfg._attn_implementation = "sdpa"
    attn = DeepseekV2Attention(cfg, layer_idx=0).eval()
    attn.load_state_dict(weights, strict=False)
    return cfg, attn.to(device=device, dtype=dtype)


def time_hf(cfg, module, x: torch.Tensor, ctx: int, steps: int) -> float:
    """One transformers decode step at context `ctx` (its cache holds ctx latent rows, as lite's does)."""
    from transformers.cache_utils import DynamicCache
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding

    cache = DynamicCache(config=cfg)
    r, p = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    cache.update(x.new_empty(1, 1, ctx, r).normal_(), x.new_empty(1, 1, ctx, p).normal_(), 0)
    freqs = DeepseekV2RotaryEmbedding(cfg).to(x.device)(x, torch.tensor([[ctx]], device=x.device))

    def step():
        module(x[None], attention_mask=None, past_key_values=cache, position_embeddings=freqs)
        cache.crop(-1)  # drop the new token: the context stays fixed across steps

    return time_steps(step, steps)


def time_steps(fn, steps: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()  # warm-up
    best = float("inf")
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true", help="time lite only")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    opts = ap.parse_args()
    device = torch.device(opts.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)

    args = ModelArgs(**LITE, rope_type="yarn", rope_factor=40.0, rope_original_max_position_embeddings=4096,
                     rope_mscale=0.707, rope_mscale_all_dim=0.707)  # fmt: skip
    d, H, n, p, v, r = 2048, 16, 128, 64, 128, 512
    w = {
        "q_proj.weight": torch.randn(H * (n + p), d) / d**0.5,
        "kv_a_proj_with_mqa.weight": torch.randn(r + p, d) / d**0.5,
        "kv_a_layernorm.weight": torch.ones(r),
        "kv_b_proj.weight": torch.randn(H * (n + v), r) / r**0.5,
        "o_proj.weight": torch.randn(d, H * v) / (H * v) ** 0.5,
    }
    kv_b = w["kv_b_proj.weight"].view(H, n + v, r)

    def on(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    attn = AttentionWeights(
        norm=on(torch.ones(d)),
        q_kv_a=QMatrix.from_float(torch.cat([w["q_proj.weight"], w["kv_a_proj_with_mqa.weight"]]), device, dtype),
        q_dim=H * (n + p),
        q_a_norm=None,
        q_b=None,
        kv_a_norm=on(w["kv_a_layernorm.weight"]),
        k_b=on(kv_b[:, :n]),  # [H, n, r]
        v_b=on(kv_b[:, n:].transpose(1, 2)),  # [H, r, v]
        out=QMatrix.from_float(w["o_proj.weight"], device, dtype),
    )
    layer = LayerWeights(attn, on(torch.ones(d)), None, None, None)
    model = Transformer(args, Weights(None, [layer], on(torch.ones(d)), None), None, device, dtype)
    x = on(torch.randn(1, d))

    hf = None if opts.skip_hf else hf_attention(LITE, w, device, dtype)
    where = f"{opts.threads} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name()
    print(f"{where}, {str(dtype).removeprefix('torch.')}; best of {opts.steps} decode steps, ms")
    print(f"{'context':>8} {'lite (absorbed)':>16} {'transformers':>13} {'speed-up':>9}")
    for ctx in opts.contexts:
        cache = LatentCache(args, ctx + opts.steps + 2, device, dtype)
        cache.data[0, :ctx].normal_()
        ours = time_steps(lambda: model.attention(0, x, cache, ctx), opts.steps) * 1e3  # noqa: B023
        theirs = float("nan")
        if hf is not None:
            try:
                theirs = time_hf(*hf, x, ctx, max(2, opts.steps // 2)) * 1e3
            except Exception as e:  # another transformers version may cache differently
                print(f"transformers step failed: {type(e).__name__}: {e}")
        print(f"{ctx:>8} {ours:>16.2f} {theirs:>13.1f} {theirs / ours:>8.1f}x")


if __name__ == "__main__":
    main()
