"""The latent cache holds exactly kv_lora_rank + qk_rope_head_dim values per layer and token."""

from __future__ import annotations

import pytest
import torch

from lite.cache import LatentCache
from lite.config import ModelArgs


def _args(**kw) -> ModelArgs:
    base = dict(
        vocab_size=32,
        hidden_size=2048,
        intermediate_size=64,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=16,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
    )
    return ModelArgs(**{**base, **kw})


@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_bytes_per_token_per_layer(dtype, size):
    args = _args()
    cache = LatentCache(args, ctx=10, dtype=dtype)
    assert cache.bytes_per_token_per_layer == (512 + 64) * size
    assert cache.nbytes == 3 * 10 * (512 + 64) * size


def test_default_dtype_is_float32_on_cpu():
    assert LatentCache(_args(), ctx=4).dtype == torch.float32


def test_write_returns_all_rows_so_far():
    args = _args(kv_lora_rank=6, qk_rope_head_dim=2)
    cache = LatentCache(args, ctx=8)
    a, b = torch.randn(3, 8), torch.randn(2, 8)
    assert torch.equal(cache.write(1, 0, a), a)
    rows = cache.write(1, 3, b)
    assert torch.equal(rows, torch.cat([a, b])) and rows.data_ptr() == cache.data[1].data_ptr()  # a view
    assert torch.count_nonzero(cache.data[0]) == 0


def test_session_cache_holds_only_latents(hf_lite):
    """A model's session allocates layers × ctx × (kv_lora_rank + qk_rope_head_dim) values, nothing else."""
    import json

    from hf_helpers import tensors_from_hf

    from lite.loader import Model

    args = ModelArgs.from_hf(json.loads((hf_lite / "config.json").read_text()))
    session = Model(args, tensors_from_hf(hf_lite, args), device="cpu").session(20)
    assert session.cache.data.shape == (args.num_hidden_layers, 20, args.kv_lora_rank + args.qk_rope_head_dim)
