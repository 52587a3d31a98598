"""Model hyper-parameters (`ModelArgs`) read from a Hugging Face config.json or from GGUF metadata.

The converter's side (config.json → the `deepseek2.*` GGUF keys) is `lite/convert/hf_meta.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from lite.errors import LiteError

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]  # "deepseek2"


# deepseek2.expert_gating_func (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE) -> config.json's scoring_func
GATING_FUNCS = {int(gguf.ExpertGatingFuncType.SOFTMAX): "softmax", int(gguf.ExpertGatingFuncType.SIGMOID): "sigmoid"}
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def _is_v3(cfg: dict[str, Any]) -> bool:
    return "DeepseekV3ForCausalLM" in (cfg.get("architectures") or []) or cfg.get("model_type") == "deepseek_v3"


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·mscale·ln(scale) + 1 (1 when not scaling)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense FFN (first_k_dense_replace layers)
    moe_intermediate_size: int  # one routed or shared expert
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None  # None: q_proj (V2-Lite); else q_a_proj → norm → q_b_proj (V2)
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" (V2) | "noaux_tc" (V3: groups by top-2 sum)
    scoring_func: str = "softmax"  # the gate: "softmax" (V2) | "sigmoid" (V3, plus a selection-only bias)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "yarn"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int | None = None
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0
    rope_attention_factor: float | None = None  # explicit YaRN attention factor, rarely set

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values per token and layer in the latent cache: the compressed KV plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    def rope_cos_sin_scale(self) -> float:
        """The factor on cos/sin (transformers' `attention_scaling` for YaRN)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        if self.rope_mscale and self.rope_mscale_all_dim:
            return yarn_get_mscale(self.rope_factor, self.rope_mscale) / yarn_get_mscale(
                self.rope_factor, self.rope_mscale_all_dim
            )
        return yarn_get_mscale(self.rope_factor)

    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 · yarn_mscale(factor, mscale_all_dim)²."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn" and self.rope_mscale_all_dim:
            m = yarn_get_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale *= m * m
        return scale

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelArgs:
        """From a config.json dict: hub style (rope_theta + rope_scaling) or transformers-5 (rope_parameters)."""
        try:
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
            theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
            n_experts = cfg.get("n_routed_experts") or 0
            v3 = _is_v3(cfg)  # transformers' DeepseekV3 always routes by sigmoid + noaux_tc
            args = cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                moe_intermediate_size=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=cfg["num_attention_heads"],
                kv_lora_rank=cfg.get("kv_lora_rank", 512),
                q_lora_rank=cfg.get("q_lora_rank"),
                qk_nope_head_dim=cfg["qk_nope_head_dim"],
                qk_rope_head_dim=cfg["qk_rope_head_dim"],
                v_head_dim=cfg["v_head_dim"],
                n_routed_experts=n_experts,
                num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
                n_shared_experts=cfg.get("n_shared_experts") or 0,
                first_k_dense_replace=int(cfg["first_k_dense_replace"])
                if cfg.get("first_k_dense_replace") is not None
                else (0 if n_experts else cfg["num_hidden_layers"]),
                topk_method=cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
                scoring_func=cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
                n_group=cfg.get("n_group") or 1,
                topk_group=cfg.get("topk_group") or 1,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                rope_theta=float(theta),
                rope_type="yarn" if rope_type == "yarn" else "default",
            )
        except KeyError as e:
            raise LiteError(f"config.json lacks {e.args[0]!r}; is this a DeepSeek-V2/V3 checkpoint?") from None
        if args.topk_method not in TOPK_METHODS:
            raise LiteError(f"topk_method {args.topk_method!r} is not supported; lite knows {', '.join(TOPK_METHODS)}")
        if args.scoring_func not in GATING_FUNCS.values():
            raise LiteError(f"scoring_func {args.scoring_func!r} is not supported; lite knows softmax, sigmoid")
        _check_groups(args, "config.json")
        if args.rope_type == "yarn":
            args.rope_factor = float(rope["factor"])
            args.rope_original_max_position_embeddings = rope["original_max_position_embeddings"]
            args.rope_beta_fast = float(rope.get("beta_fast") or 32.0)
            args.rope_beta_slow = float(rope.get("beta_slow") or 1.0)
            args.rope_mscale = float(rope.get("mscale") or 0.0)
            args.rope_mscale_all_dim = float(rope.get("mscale_all_dim") or 0.0)
            attn = rope.get("attention_factor", rope.get("attn_factor"))
            args.rope_attention_factor = None if attn is None else float(attn)
        return args

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> ModelArgs:
        """From `deepseek2.*` GGUF metadata, current layout (head_count_kv=1, key_length=576, *_mla keys) or older."""
        arch = meta.get("general.architecture", ARCH)
        if arch != ARCH:
            raise LiteError(f"the GGUF architecture is {arch!r}, not {ARCH!r}; lite runs DeepSeek-V2/V3 models only")

        def get(key: str, default: Any = KeyError) -> Any:
            value = meta.get(key.format(arch=ARCH), default)
            if value is KeyError:
                raise LiteError(
                    f"GGUF metadata lacks {key.format(arch=ARCH)!r}; the file is not a complete deepseek2 GGUF"
                )
            return _f32(value) if isinstance(value, float) else value

        K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
        rope_dim = get(R.DIMENSION_COUNT)
        if meta.get(A.KEY_LENGTH_MLA.format(arch=ARCH)) is not None:  # current layout: MQA over the latent
            qk_head, v_head = get(A.KEY_LENGTH_MLA), get(A.VALUE_LENGTH_MLA)
        else:  # older layout: per-head key/value lengths
            qk_head, v_head = get(A.KEY_LENGTH), get(A.VALUE_LENGTH)
        n_group, topk_group = get(K.EXPERT_GROUP_COUNT, 1) or 1, get(K.EXPERT_GROUP_USED_COUNT, 1) or 1
        gating = get(K.EXPERT_GATING_FUNC, int(gguf.ExpertGatingFuncType.SOFTMAX))  # absent: V2 (as llama.cpp)
        if isinstance(gating, bool) or not isinstance(gating, int) or gating not in GATING_FUNCS:
            raise LiteError(
                f"unknown router variant: {K.EXPERT_GATING_FUNC.format(arch=ARCH)} = {gating!r}; lite knows "
                "1 (softmax, DeepSeek-V2) and 2 (sigmoid, DeepSeek-V3/R1, Moonlight, Kimi-K2)"
            )
        scoring = GATING_FUNCS[gating]
        try:  # arithmetic on a value of the wrong type (a string where a number belongs)
            n_experts = get(K.EXPERT_COUNT, 0)
            token_embd = meta.get("tokenizer.ggml.tokens")
            args = cls(
                vocab_size=get(K.VOCAB_SIZE, len(token_embd) if token_embd else KeyError),
                hidden_size=get(K.EMBEDDING_LENGTH),
                intermediate_size=get(K.FEED_FORWARD_LENGTH),
                moe_intermediate_size=get(K.EXPERT_FEED_FORWARD_LENGTH, get(K.FEED_FORWARD_LENGTH)),
                num_hidden_layers=get(K.BLOCK_COUNT),
                num_attention_heads=get(A.HEAD_COUNT),
                kv_lora_rank=get(A.KV_LORA_RANK),
                q_lora_rank=get(A.Q_LORA_RANK, None) or None,  # 0 or absent: q_proj (V2-Lite)
                qk_nope_head_dim=qk_head - rope_dim,
                qk_rope_head_dim=rope_dim,
                v_head_dim=v_head,
                n_routed_experts=n_experts,
                num_experts_per_tok=get(K.EXPERT_USED_COUNT, 0),
                n_shared_experts=get(K.EXPERT_SHARED_COUNT, 0),
                first_k_dense_replace=get(K.LEADING_DENSE_BLOCK_COUNT, 0),
                # GGUF has no topk_method: V2's groups rank by their best expert, V3's by their top-2 sum
                topk_method="noaux_tc"
                if scoring == "sigmoid"
                else ("group_limited_greedy" if n_group > 1 else "greedy"),
                scoring_func=scoring,
                n_group=n_group,
                topk_group=topk_group,
                norm_topk_prob=bool(get(K.EXPERT_WEIGHTS_NORM, False)),
                routed_scaling_factor=get(K.EXPERT_WEIGHTS_SCALE, 1.0),
                rms_norm_eps=get(A.LAYERNORM_RMS_EPS),
                max_position_embeddings=get(K.CONTEXT_LENGTH),
                rope_theta=get(R.FREQ_BASE, 10000.0),
            )
        except (TypeError, ValueError) as e:
            raise LiteError(f"GGUF metadata holds a value of the wrong type ({e}); the file is corrupt") from None
        _check_gguf_args(args, meta)  # types and ranges first: the group check does arithmetic on them
        _check_groups(args, "the GGUF")
        if get(R.SCALING_TYPE, "none") == "yarn":
            args.rope_type = "yarn"
            args.rope_factor = get(R.SCALING_FACTOR)
            args.rope_original_max_position_embeddings = get(R.SCALING_ORIG_CTX_LEN)
            args.rope_beta_fast = get(R.SCALING_YARN_BETA_FAST, 32.0)
            args.rope_beta_slow = get(R.SCALING_YARN_BETA_SLOW, 1.0)
            # llama.cpp stores 0.1·mscale_all_dim and assumes mscale == mscale_all_dim (true for all DeepSeek-V2)
            args.rope_mscale_all_dim = round(get(R.SCALING_YARN_LOG_MUL, 0.0) * 10.0, 6)
            args.rope_mscale = args.rope_mscale_all_dim
            args.rope_attention_factor = get(R.SCALING_YARN_ATTN_FACTOR, None)
        return args


def _check_gguf_args(args: ModelArgs, meta: dict[str, Any]) -> None:
    """Refuse metadata that is of the wrong type, out of range, or disagrees with itself, naming the key."""
    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    minimum = {  # field: (key, smallest valid value)
        "vocab_size": (K.VOCAB_SIZE, 1), "hidden_size": (K.EMBEDDING_LENGTH, 1),
        "intermediate_size": (K.FEED_FORWARD_LENGTH, 1), "moe_intermediate_size": (K.EXPERT_FEED_FORWARD_LENGTH, 1),
        "num_hidden_layers": (K.BLOCK_COUNT, 1), "num_attention_heads": (A.HEAD_COUNT, 1),
        "kv_lora_rank": (A.KV_LORA_RANK, 1), "qk_rope_head_dim": (R.DIMENSION_COUNT, 2),
        "qk_nope_head_dim": (A.KEY_LENGTH_MLA, 0), "v_head_dim": (A.VALUE_LENGTH_MLA, 1),
        "n_routed_experts": (K.EXPERT_COUNT, 0), "num_experts_per_tok": (K.EXPERT_USED_COUNT, 0),
        "n_shared_experts": (K.EXPERT_SHARED_COUNT, 0), "first_k_dense_replace": (K.LEADING_DENSE_BLOCK_COUNT, 0),
        "n_group": (K.EXPERT_GROUP_COUNT, 1), "topk_group": (K.EXPERT_GROUP_USED_COUNT, 1),
        "max_position_embeddings": (K.CONTEXT_LENGTH, 1),
    }  # fmt: skip

    def bad(key: str, value: Any, rule: str) -> LiteError:
        return LiteError(f"GGUF metadata {key.format(arch=ARCH)} = {value!r} {rule}; the file is corrupt")

    for name, (key, low) in minimum.items():
        v = getattr(args, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise bad(key, v, f"is not a whole number >= {low}")
    if args.q_lora_rank is not None and (isinstance(args.q_lora_rank, bool) or not isinstance(args.q_lora_rank, int)):
        raise bad(A.Q_LORA_RANK, args.q_lora_rank, "is not a whole number")
    for name, key in (("rms_norm_eps", A.LAYERNORM_RMS_EPS), ("rope_theta", R.FREQ_BASE),
                      ("routed_scaling_factor", K.EXPERT_WEIGHTS_SCALE)):  # fmt: skip
        v = getattr(args, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise bad(key, v, "is not a finite number > 0")
    if args.num_experts_per_tok > args.n_routed_experts:
        raise bad(K.EXPERT_USED_COUNT, args.num_experts_per_tok, f"exceeds the {args.n_routed_experts} experts")
    if args.first_k_dense_replace > args.num_hidden_layers:
        raise bad(K.LEADING_DENSE_BLOCK_COUNT, args.first_k_dense_replace, "exceeds the block count")
    if args.topk_group > args.n_group or (args.n_routed_experts and args.n_routed_experts % args.n_group):
        raise bad(K.EXPERT_GROUP_COUNT, args.n_group, "does not divide the experts into groups")
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != args.vocab_size:
        raise bad(K.VOCAB_SIZE, args.vocab_size, f"disagrees with the {len(tokens)} tokens of the tokenizer")


def check_tensor_layers(args: ModelArgs, names: Any) -> None:
    """Refuse a file with tensors for layers beyond its block count (they would be silently ignored)."""
    extra = sorted({int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdigit()})
    if extra and extra[-1] >= args.num_hidden_layers:
        raise LiteError(
            f"the GGUF has tensors for layer {extra[-1]} but {ARCH}.block_count is {args.num_hidden_layers}; "
            "the metadata disagrees with the tensors: the file is corrupt"
        )


def _check_groups(args: ModelArgs, where: str) -> None:
    """Group-limited routing splits the experts into n_group equal groups and keeps topk_group of them."""
    if args.n_routed_experts % args.n_group or (args.n_group > 1 and args.topk_group < 1):
        raise LiteError(
            f"{where} routes {args.n_routed_experts} experts in {args.n_group} groups keeping {args.topk_group}; "
            "the experts must split evenly into the groups and at least one group be kept"
        )


def _f32(x: float) -> float:
    """The shortest decimal that a float32 value round-trips to (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))
