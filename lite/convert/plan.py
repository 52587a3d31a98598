"""The converter's plan: read and check an HF checkpoint's headers, then choose each GGUF tensor's type by the
recipe (`recipes.py`) and the user's overrides.

Nothing here reads weight data: shapes come from the safetensors headers, so a plan (and `--dry-run`) is
instant even for a large model. `writer.py` streams the weights through the plan.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from safetensors import SafetensorError, safe_open

from lite.config import ModelArgs
from lite.convert import fp8
from lite.convert.names import TensorPlan, plan_tensors
from lite.convert.recipes import (
    DEFAULT_RECIPE,
    NO_OVERRIDES,
    OUTTYPES,
    RECIPES,
    TYPE_NAMES,
    Choice,
    Overrides,
    choose,
    role_of,
)
from lite.convert.recipes import file_type as recipe_file_type
from lite.errors import LiteError
from quant.formats import nbytes

Q = gguf.GGMLQuantizationType
SUPPORTED_ARCHS = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")  # V3: also R1, Moonlight, Kimi-K2
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_DTYPE_BYTES = {"F8_E4M3": 1, "F8_E5M2": 1}
_DTYPE_BYTES |= {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class PlannedTensor:
    """One output tensor: its name, shape and type, and what it is made from (`src`)."""

    name: str
    shape: tuple[int, ...]  # torch order
    qtype: Q
    role: str  # "expert" | "norm" | "router" | "rest"
    wanted: Q  # the recipe's type before any fallback
    in_bytes: int  # bytes of the source tensors
    src: Any  # an HF TensorPlan (sources, kind) or the input GGUF's TensorRef
    shards: tuple[Path, ...] = ()  # HF: the shard of each source

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def out_bytes(self) -> int:
        return nbytes(self.shape, self.qtype)


@dataclass
class Checkpoint:
    """An HF checkpoint folder with its config and the header (shape, dtype, shard) of every tensor."""

    path: Path
    config: dict[str, Any]
    args: ModelArgs
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    shard_of: dict[str, Path]
    shard_files: list[Path] = field(default_factory=list)
    scales: dict[str, str] = field(default_factory=dict)  # FP8 weight → its weight_scale_inv (fp8.py)
    fp8_block: tuple[int, int] = fp8.DEFAULT_BLOCK
    mtp_layers: int = 0  # multi-token-prediction layers (index ≥ num_hidden_layers): skipped, as llama.cpp does

    @property
    def input_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shard_files)


def open_checkpoint(hf_dir: str | Path) -> Checkpoint:
    """Check the folder, config and shards, and read every tensor header. Raises LiteError (one line) on bad input."""
    path = Path(hf_dir)
    if not path.exists():
        raise LiteError(f"{path} does not exist; pass a Hugging Face model folder (config.json + *.safetensors)")
    if not path.is_dir():
        raise LiteError(f"{path} is not a directory; pass the model folder that holds config.json, not a file")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise LiteError(f"{path} has no config.json; pass a Hugging Face model folder (config.json + *.safetensors)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LiteError(f"{cfg_path} is not valid JSON ({e}); re-download it") from None
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    if not any(a in SUPPORTED_ARCHS for a in archs):
        raise LiteError(
            f"unsupported architecture {archs[0]!r} in {cfg_path}; lite converts DeepSeek-V2/V2-Lite and the V3 "
            f"family: V3/R1, Moonlight, Kimi-K2 ({', '.join(SUPPORTED_ARCHS)}) only"
        )
    args = ModelArgs.from_hf(config)
    block = fp8.block_size(config)
    shard_files = _shard_files(path)
    shapes, dtypes, shard_of = {}, {}, {}
    for shard in shard_files:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    shapes[name], dtypes[name], shard_of[name] = tuple(sl.get_shape()), sl.get_dtype(), shard
        except SafetensorError as e:
            raise LiteError(f"{shard} is truncated or corrupt ({e}); re-download it") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        for name, shard in json.loads(index.read_text()).get("weight_map", {}).items():
            if name not in shard_of:
                raise LiteError(f"{shard} lacks {name}, which {index.name} lists; the shard is damaged: re-download it")
    scales = _fp8_scales(shapes, dtypes, block or fp8.DEFAULT_BLOCK)
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    mtp = len([i for i in layers if i >= args.num_hidden_layers])  # num_nextn_predict_layers of them, normally
    block = block or fp8.DEFAULT_BLOCK
    return Checkpoint(path, config, args, shapes, dtypes, shard_of, shard_files, scales, block, mtp)


def _fp8_scales(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], block: tuple[int, int]) -> dict[str, str]:
    """{FP8 weight: its weight_scale_inv}, each scale checked against its weight's shape."""
    scales = {}
    for name, dtype in dtypes.items():
        if name.endswith(fp8.SCALE_SUFFIX):
            weight = name[: -len(fp8.SCALE_SUFFIX)]
            if dtypes.get(weight) not in fp8.FP8_DTYPES:
                raise LiteError(f"{name} scales {weight}, which is not an fp8 weight; the checkpoint is inconsistent")
        elif dtype in fp8.FP8_DTYPES:
            scale = fp8.scale_name(name)
            if scale not in shapes:
                raise LiteError(f"{name} is {dtype} but the checkpoint lacks its block scales {scale}; re-download it")
            want = fp8.scale_shape(shapes[name], block) if len(shapes[name]) == 2 else None
            if shapes[scale] != want:
                raise LiteError(
                    f"{scale} has shape {list(shapes[scale])}, but a {block[0]}x{block[1]}-block fp8 weight of shape "
                    f"{list(shapes[name])} needs {list(want) if want else 'a 2-D weight'}"
                )
            scales[name] = scale
    return scales


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LiteError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (path / name).is_file():
                raise LiteError(f"shard {name} listed in {index.name} is missing from {path}; download it")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LiteError(f"{path} has no *.safetensors files; lite converts safetensors checkpoints only")
    return files


def expected_shape(name: str, args: ModelArgs) -> tuple[int, ...] | None:
    """The torch-order shape config.json implies for a GGUF tensor name (None for names it cannot tell)."""
    a = args
    h, d, qk = a.num_attention_heads, a.hidden_size, a.qk_head_dim
    shexp = a.moe_intermediate_size * a.n_shared_experts
    n_exp, moe = a.n_routed_experts, a.moe_intermediate_size
    base = name.split(".")[-2] if name.startswith("blk.") else name.rsplit(".", 1)[0]
    table: dict[str, tuple[int, ...]] = {
        "token_embd": (a.vocab_size, d),
        "output": (a.vocab_size, d),
        "output_norm": (d,),
        "attn_norm": (d,),
        "ffn_norm": (d,),
        "attn_q": (h * qk, d),
        "attn_q_a": (a.q_lora_rank or 0, d),
        "attn_q_a_norm": (a.q_lora_rank or 0,),
        "attn_q_b": (h * qk, a.q_lora_rank or 0),
        "attn_kv_a_mqa": (a.kv_lora_rank + a.qk_rope_head_dim, d),
        "attn_kv_a_norm": (a.kv_lora_rank,),
        "attn_kv_b": (h * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),
        "attn_k_b": (h, a.kv_lora_rank, a.qk_nope_head_dim),
        "attn_v_b": (h, a.v_head_dim, a.kv_lora_rank),
        "attn_output": (d, h * a.v_head_dim),
        "ffn_gate": (a.intermediate_size, d),
        "ffn_up": (a.intermediate_size, d),
        "ffn_down": (d, a.intermediate_size),
        "ffn_gate_inp": (n_exp, d),
        "exp_probs_b": (n_exp,),
        "ffn_gate_exps": (n_exp, moe, d),
        "ffn_up_exps": (n_exp, moe, d),
        "ffn_down_exps": (n_exp, d, moe),
        "ffn_gate_shexp": (shexp, d),
        "ffn_up_shexp": (shexp, d),
        "ffn_down_shexp": (d, shexp),
    }
    return table.get(base)


def resolve_overrides(
    recipe: str | None, outtype: str | None, experts: str | None, rest: str | None
) -> tuple[str, Overrides]:
    """The recipe and the user's overrides of it (LiteError, naming the flag, for unknown names)."""
    recipe = (recipe or DEFAULT_RECIPE).lower()
    if recipe not in RECIPES:
        raise LiteError(f"unknown --recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if outtype is not None and outtype.lower() not in OUTTYPES:
        raise LiteError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    for flag, value in (("--experts", experts), ("--rest", rest)):
        if value is not None and value.lower() not in TYPE_NAMES:
            raise LiteError(f"unknown {flag} {value!r}; choose one of {', '.join(TYPE_NAMES)}")
    base = TYPE_NAMES[outtype.lower()] if outtype else None
    e = TYPE_NAMES[experts.lower()] if experts else base
    r = TYPE_NAMES[rest.lower()] if rest else base
    return recipe, Overrides(e, r)


def plan_types(
    names_shapes: list[tuple[str, tuple[int, ...]]],
    recipe: str,
    overrides: Overrides,
    n_layers: int,
    n_expert: int,
    keep: list[Q | None] | None = None,
) -> list[tuple[str, Choice]]:
    """(role, Choice) of every tensor; LiteError when a recipe cannot be applied to a name."""
    try:
        choices = choose(recipe, names_shapes, n_layers, n_expert, overrides, keep)
    except ValueError as e:
        raise LiteError(f"recipe {recipe}: {e}") from None
    return [(role_of(n, s), c) for (n, s), c in zip(names_shapes, choices)]


def plan(
    ckpt: Checkpoint, recipe: str = DEFAULT_RECIPE, overrides: Overrides = NO_OVERRIDES, legacy_kv_b: bool = False
) -> list[PlannedTensor]:
    """Every output tensor in file order, with its type; checks every shape against config.json."""
    args = ckpt.args
    tie = bool(ckpt.config.get("tie_word_embeddings", False))
    srcs = plan_tensors(ckpt.shapes, args, tie_word_embeddings=tie)
    if legacy_kv_b:  # the single attn_kv_b of older llama.cpp files, so the loader's legacy path gets tested
        legacy = []
        for p in srcs:
            if p.kind == "k_b":
                legacy.append(
                    TensorPlan(p.name.replace("attn_k_b", "attn_kv_b"), p.sources, "copy", ckpt.shapes[p.sources[0]])
                )
            elif p.kind != "v_b":
                legacy.append(p)
        srcs = legacy
    _check_shapes(ckpt, srcs)
    types = plan_types([(p.name, p.shape) for p in srcs], recipe, overrides, args.num_hidden_layers,
                       args.n_routed_experts)  # fmt: skip
    out = []
    for p, (role, c) in zip(srcs, types):
        in_bytes = sum(_n(ckpt.shapes[s]) * _DTYPE_BYTES.get(ckpt.dtypes[s], 4) for s in p.sources)
        if p.kind == "v_b":
            in_bytes = 0  # k_b and v_b share one source; count its bytes once (with k_b)
        shards = tuple(ckpt.shard_of[s] for s in p.sources)
        out.append(PlannedTensor(p.name, p.shape, c.qtype, role, c.wanted, in_bytes, p, shards))
    return out


def _check_shapes(ckpt: Checkpoint, srcs: list[TensorPlan]) -> None:
    """Each tensor (and each expert of a stack) against config.json; every expected tensor present."""
    args, seen = ckpt.args, set()
    for p in srcs:
        seen.add(p.name)
        want = expected_shape(p.name, args)
        if want is None:
            continue
        if p.kind == "stack":
            for s in p.sources:
                if ckpt.shapes[s] != want[1:]:
                    raise LiteError(
                        f"{s} has shape {list(ckpt.shapes[s])} but config.json implies {list(want[1:])}; "
                        "the config and weights do not match"
                    )
        if p.shape != want:
            raise LiteError(
                f"{p.sources[0]} has shape {list(p.shape)} but config.json implies {list(want)}; "
                "the config and weights do not match"
            )
    legacy = any(".attn_kv_b." in n for n in seen)
    tied = bool(ckpt.config.get("tie_word_embeddings", False))
    missing = [n for n in _required_names(args, legacy, tied) if n not in seen]
    if missing:
        raise LiteError(
            f"the checkpoint lacks the tensor for {missing[0]} (and {len(missing) - 1} more); re-download it"
        )


def _required_names(args: ModelArgs, legacy_kv_b: bool, tied: bool) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    for i in range(args.num_hidden_layers):
        attn = ["attn_norm", "ffn_norm", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_output"]
        attn += ["attn_q_a", "attn_q_a_norm", "attn_q_b"] if args.q_lora_rank else ["attn_q"]
        attn += ["attn_kv_b"] if legacy_kv_b else ["attn_k_b", "attn_v_b"]
        if args.is_moe_layer(i):
            ffn = ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
            ffn += ["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"] if args.n_shared_experts else []
        else:
            ffn = ["ffn_gate", "ffn_up", "ffn_down"]
        names += [f"blk.{i}.{n}.weight" for n in attn + ffn]
        if args.is_moe_layer(i) and args.topk_method == "noaux_tc":  # V3 routing needs its correction bias
            names.append(f"blk.{i}.exp_probs_b.bias")
    return names


def file_type(tensors: list[PlannedTensor], recipe: str, overrides: Overrides) -> gguf.LlamaFileType:
    """general.file_type: a llama.cpp recipe's own, else named after the routed experts' type (or the largest
    tensor's when there are none)."""
    experts = [t for t in tensors if t.role == "expert"]
    main = max(experts or tensors, key=lambda t: t.n_elements).wanted if tensors else None
    return recipe_file_type(recipe, overrides, main)


def _n(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
