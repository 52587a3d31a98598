"""Where the converter's weights and metadata come from: a Hugging Face folder or a GGUF file.

Both give the tensors as slices of whole rows (one expert, or at most about `chunk` values of a large matrix) so
the converter's memory stays at one slice whatever the model size:
- HF: memory-mapped safetensors, each shard opened for one tensor only; bf16/f16/f32 become float32, FP8
  (DeepSeek-V3's e4m3 with 128x128 block scales) is dequantized exactly.
- GGUF (F32, F16, BF16 or Q8_0, lite's or llama.cpp's): raw rows read with `pread` (no mapping left behind),
  decoded to float32 only when the tensor changes type; metadata copied with its value types.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from lite.chat_template import KIMI_K2_CHAT_TEMPLATE, default_chat_template
from lite.config import ARCH
from lite.convert import fp8
from lite.convert.hf_meta import add_metadata, gguf_metadata_from_hf
from lite.convert.names import build_tensor
from lite.convert.plan import Checkpoint, PlannedTensor, plan_types
from lite.convert.recipes import Overrides
from lite.convert.tokenizer_meta import add_tokenizer_metadata, has_tokenizer
from lite.errors import LiteError
from quant.formats import FLOAT_TYPES, nbytes
from quant.gguf_file import GGUFFile, TensorRef

Q = gguf.GGMLQuantizationType
GGUF_INPUT_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)  # requantized; other types only copied as they are
# set anew by the converter (the writer, the recipe) rather than copied
_SKIP_KEYS: tuple[str, ...] = (
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
)
_SKIP_KEYS += ("split.",)


@dataclass
class Slice:
    """Rows of one output tensor: float32 values (`x`), or the source's raw bytes (`raw`, same type as the output)."""

    x: torch.Tensor | None
    raw: np.ndarray | None
    in_bytes: int  # input bytes this slice stands for (progress)
    source: str  # the input tensor's name, for messages


# ---- Hugging Face -------------------------------------------------------------------------------------------


def hf_slices(ckpt: Checkpoint, t: PlannedTensor, chunk: int) -> Iterator[Slice]:
    """The tensor's rows in order. Each shard is opened (memory-mapped) for this tensor only. FP8 weights are
    dequantized slice by slice with the matching rows of their block scales (`fp8.py`)."""
    kind, sources = t.src.kind, t.src.sources
    with ExitStack() as stack:
        files: dict[Path, Any] = {}

        def read(name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
            """Rows [r0, r1) of a source (all of it for None), float32, dequantized if it is fp8."""
            shard = ckpt.shard_of[name]
            if shard not in files:
                files[shard] = stack.enter_context(safe_open(str(shard), framework="pt"))
            sl = files[shard].get_slice(name)
            x = sl[:] if rows is None else sl[rows[0] : rows[1]]
            scale = ckpt.scales.get(name)
            if scale is not None:
                x = fp8.dequantize(x, read(scale), ckpt.fp8_block, 0 if rows is None else rows[0])
            return x.float()

        share = t.in_bytes // max(1, len(sources))
        if kind == "stack":  # one expert at a time: [out, in] each, stacked along the first axis
            for s in sources:
                yield Slice(read(s), None, share, s)
        elif kind in ("k_b", "v_b"):  # small: split the whole kv_b
            s = sources[0]
            yield Slice(build_tensor(t.src, [read(s)], ckpt.args).float(), None, t.in_bytes, s)
        elif kind in ("fused_gate", "fused_up"):  # transformers-5 fused [n_expert, 2·inter, hidden]
            s = sources[0]
            for e in range(t.shape[0]):
                gate, up = read(s, (e, e + 1))[0].chunk(2, dim=0)
                yield Slice(gate if kind == "fused_gate" else up, None, t.in_bytes // (2 * t.shape[0]), s)
        elif kind == "copy":
            s = sources[0]
            if len(t.shape) <= 1:
                yield Slice(read(s), None, t.in_bytes, s)
                return
            row = int(np.prod(t.shape[1:]))
            step = max(1, chunk // row)
            for r in range(0, t.shape[0], step):
                n = min(step, t.shape[0] - r)
                yield Slice(read(s, (r, r + n)), None, t.in_bytes * n // t.shape[0], s)
        else:
            raise ValueError(f"unknown tensor kind {kind!r}")


def add_hf_metadata(writer: gguf.GGUFWriter, ckpt: Checkpoint, legacy: bool) -> list[str]:
    """general.* and deepseek2.* keys, as llama.cpp's converter writes them (file type and quantization version
    follow, then the tokenizer)."""
    notes: list[str] = []
    writer.add_type(gguf.GGUFType.MODEL)
    name = ckpt.config.get("_name_or_path") or ckpt.path.resolve().name
    writer.add_name(Path(str(name)).name)
    meta = gguf_metadata_from_hf(ckpt.config)
    if legacy:  # older llama.cpp files: per-head key/value lengths and no *_mla keys
        a, k = ckpt.args, gguf.Keys.Attention
        meta[k.HEAD_COUNT_KV.format(arch=ARCH)] = a.num_attention_heads
        meta[k.KEY_LENGTH.format(arch=ARCH)] = a.qk_head_dim
        meta[k.VALUE_LENGTH.format(arch=ARCH)] = a.v_head_dim
        meta.pop(k.KEY_LENGTH_MLA.format(arch=ARCH), None)
        meta.pop(k.VALUE_LENGTH_MLA.format(arch=ARCH), None)
        notes.append("legacy layout: a single attn_kv_b per layer")
    if ckpt.mtp_layers:
        notes.append(
            f"skipped {ckpt.mtp_layers} multi-token-prediction layer(s) (num_nextn_predict_layers), as llama.cpp does"
        )
    if ckpt.scales:
        b = ckpt.fp8_block
        notes.append(f"{len(ckpt.scales)} fp8 weights dequantized exactly with their {b[0]}x{b[1]} block scales")
    q_lora = gguf.Keys.Attention.Q_LORA_RANK.format(arch=ARCH)
    if ckpt.args.q_lora_rank is None:
        # llama.cpp skips reading q_lora_rank only for 26- or 27-layer models (the real V2-Lite) and fails on
        # any other q_proj model without it; 0 tells it (and lite) "q_proj, no q LoRA" for every depth.
        meta[q_lora] = 0
    add_metadata(writer, meta)
    return notes


def add_hf_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, notes: list[str]) -> bool:
    if not has_tokenizer(hf_dir):
        # "none" (no tokens) lets llama.cpp load the file for token-id use, as its vocab-less models do
        writer.add_tokenizer_model("none")
        notes.append(
            "no tokenizer.json or tiktoken.model: the GGUF has no tokenizer (token ids only; `lite chat` needs one)"
        )
        return False
    notes.extend(add_tokenizer_metadata(writer, hf_dir))
    kv, keys = writer.kv_data[0], gguf.Keys.Tokenizer
    if keys.CHAT_TEMPLATE not in kv:
        # lite's Tokenizer then picks a built-in format by the special tokens, as this names it
        special = {t for t, k in zip(kv[keys.LIST].value, kv[keys.TOKEN_TYPE].value) if k != gguf.TokenType.NORMAL}
        which = "Kimi-K2's" if default_chat_template(special) == KIMI_K2_CHAT_TEMPLATE else "DeepSeek-V2-Chat's"
        notes.append(f"no chat template in tokenizer_config.json: `lite chat` will use {which} built-in format")
    return True


# ---- GGUF ---------------------------------------------------------------------------------------------------


def open_gguf_input(path: Path) -> GGUFFile:
    """The input GGUF, validated, with a deepseek2 architecture and its layer and expert counts."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise LiteError(
                f"{path} is not a directory or a GGUF file; pass the model folder that holds config.json, or a .gguf"
            )
    f = GGUFFile(path)
    if f.architecture != ARCH:
        raise LiteError(f"{path} is a {f.architecture!r} model; lite converts DeepSeek-V2 / V2-Lite ({ARCH}) only")
    for key in (f"{ARCH}.block_count", f"{ARCH}.expert_count"):
        if not isinstance(f.metadata.get(key), int):
            raise LiteError(f"{path} lacks {key}; it is not a complete {ARCH} GGUF: convert it again")
    return f


def plan_gguf(f: GGUFFile, recipe: str, overrides: Overrides) -> list[PlannedTensor]:
    """Every tensor of the input in file order, with its new type. Norms and routers keep a float type as they are
    (llama.cpp does the same); a tensor is requantized only from F32, F16, BF16 or Q8_0."""
    refs = list(f.tensors.values())
    keep = [t.qtype if t.qtype in FLOAT_TYPES else None for t in refs]
    n_layers, n_expert = f.metadata[f"{ARCH}.block_count"], f.metadata[f"{ARCH}.expert_count"]
    types = plan_types([(t.name, t.shape) for t in refs], recipe, overrides, n_layers, n_expert, keep)
    out = []
    for t, (role, c) in zip(refs, types):
        if c.qtype != t.qtype and t.qtype not in GGUF_INPUT_TYPES:
            raise LiteError(
                f"{f.path}: tensor {t.name} is {t.qtype.name}; lite requantizes GGUFs in F32, F16, BF16 or Q8_0 only "
                "(quantizing twice loses accuracy): convert from the Hugging Face weights or a bf16 GGUF"
            )
        out.append(PlannedTensor(t.name, t.shape, c.qtype, role, c.wanted, t.nbytes, t))
    return out


def add_gguf_metadata(writer: gguf.GGUFWriter, f: GGUFFile) -> None:
    """Every key of the input with its value types, but file type, quantization version and split keys (set anew)."""
    for key, value in f.metadata.items():
        if key.startswith(_SKIP_KEYS):
            continue
        types = f.header.value_types[key]
        writer.add_key_value(key, value, types[0], sub_type=types[1] if len(types) > 1 else None)
    if "general.alignment" in f.metadata:
        writer.add_custom_alignment(int(f.metadata["general.alignment"]))


def _pread(fd: int, size: int, offset: int, path: str, name: str) -> np.ndarray:
    buf = np.empty(size, dtype=np.uint8)
    done = 0
    while done < size:
        got = os.preadv(fd, [buf.data[done:]], offset + done)
        if got <= 0:
            raise LiteError(f"{path} ended while reading tensor {name}; the file changed or is truncated")
        done += got
    return buf


def gguf_slices(f: GGUFFile, t: PlannedTensor, chunk: int) -> Iterator[Slice]:
    """The tensor's rows in order, read with pread into a fresh buffer per slice: float32 values when it changes
    type, else its raw bytes."""
    ref: TensorRef = t.src
    row = ref.shape[-1] if ref.shape else 1
    n_rows = ref.n_elements // row
    row_bytes = nbytes((row,), ref.qtype)
    step = max(1, chunk // row)
    with open(f.path, "rb", buffering=0) as fh:
        for r in range(0, n_rows, step):
            n = min(step, n_rows - r)
            raw = _pread(fh.fileno(), n * row_bytes, ref.offset + r * row_bytes, f.path, t.name)
            if t.qtype == ref.qtype:
                yield Slice(None, raw.reshape(n, row_bytes), raw.nbytes, t.name)
            else:
                from quant.formats import dequantize

                yield Slice(dequantize(raw, ref.qtype, (n, row)), None, raw.nbytes, t.name)
