"""A Hugging Face config.json → the `deepseek2.*` GGUF metadata keys, as llama.cpp's converter writes them.

`gguf_metadata_from_hf` produces the keys that llama.cpp's convert_hf_to_gguf.py writes
(DeepseekV2Model.set_gguf_parameters and TextModel.set_gguf_parameters), and `add_metadata` writes them
with the value types llama.cpp uses, so a converted file loads in llama.cpp.
"""

from __future__ import annotations

from typing import Any

import gguf

from lite.config import ARCH, GATING_FUNCS, ModelArgs


def gguf_metadata_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """The `deepseek2.*` keys llama.cpp's converter writes for a DeepseekV2 config.json (not general.* or tokenizer)."""
    args = ModelArgs.from_hf(cfg)  # validates
    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    out: dict[Any, Any] = {
        K.BLOCK_COUNT: args.num_hidden_layers,
        K.CONTEXT_LENGTH: args.max_position_embeddings,
        K.EMBEDDING_LENGTH: args.hidden_size,
        K.FEED_FORWARD_LENGTH: args.intermediate_size,
        A.HEAD_COUNT: args.num_attention_heads,
        A.HEAD_COUNT_KV: 1,  # MLA is run as MQA over the latent
    }
    if args.rope_type == "yarn":
        out[R.SCALING_TYPE] = gguf.RopeScalingType.YARN.value
        out[R.SCALING_FACTOR] = args.rope_factor
        out[R.SCALING_ORIG_CTX_LEN] = args.rope_original_max_position_embeddings
        if rope.get("extrapolation_factor") is not None:
            out[R.SCALING_YARN_EXT_FACTOR] = float(rope["extrapolation_factor"])
        if args.rope_attention_factor is not None:
            out[R.SCALING_YARN_ATTN_FACTOR] = args.rope_attention_factor
        if rope.get("beta_fast") is not None:
            out[R.SCALING_YARN_BETA_FAST] = float(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            out[R.SCALING_YARN_BETA_SLOW] = float(rope["beta_slow"])
    out[R.FREQ_BASE] = args.rope_theta
    out[A.LAYERNORM_RMS_EPS] = args.rms_norm_eps
    if cfg.get("num_experts_per_tok") is not None:
        out[K.EXPERT_USED_COUNT] = args.num_experts_per_tok
    if cfg.get("n_group") is not None:
        out[K.EXPERT_GROUP_COUNT] = args.n_group
    if cfg.get("topk_group") is not None:
        out[K.EXPERT_GROUP_USED_COUNT] = args.topk_group
    out[K.EXPERT_GATING_FUNC] = next(k for k, v in GATING_FUNCS.items() if v == args.scoring_func)
    out[K.LEADING_DENSE_BLOCK_COUNT] = args.first_k_dense_replace
    out[K.VOCAB_SIZE] = args.vocab_size
    if args.q_lora_rank is not None:
        out[A.Q_LORA_RANK] = args.q_lora_rank
    out[A.KV_LORA_RANK] = args.kv_lora_rank
    out[A.KEY_LENGTH] = args.kv_lora_rank + args.qk_rope_head_dim
    out[A.VALUE_LENGTH] = args.kv_lora_rank
    out[A.KEY_LENGTH_MLA] = args.qk_head_dim
    out[A.VALUE_LENGTH_MLA] = args.v_head_dim
    out[K.EXPERT_FEED_FORWARD_LENGTH] = args.moe_intermediate_size
    if args.n_routed_experts:
        out[K.EXPERT_COUNT] = args.n_routed_experts
    out[K.EXPERT_SHARED_COUNT] = args.n_shared_experts
    if cfg.get("routed_scaling_factor") is not None:
        out[K.EXPERT_WEIGHTS_SCALE] = args.routed_scaling_factor
    if args.norm_topk_prob:
        out[K.EXPERT_WEIGHTS_NORM] = True
    out[R.DIMENSION_COUNT] = args.qk_rope_head_dim
    if rope.get("mscale_all_dim") is not None:
        # llama.cpp's legacy convention (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX): 0.1·mscale_all_dim
        out[R.SCALING_YARN_LOG_MUL] = 0.1 * float(rope["mscale_all_dim"])
    return {key.format(arch=ARCH): value for key, value in out.items()}


def add_metadata(writer: gguf.GGUFWriter, meta: dict[str, Any]) -> None:
    """Write `meta` (from `gguf_metadata_from_hf`) with llama.cpp's types: ints uint32, floats float32."""
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            raise TypeError(f"unexpected metadata value for {key}: {value!r}")
