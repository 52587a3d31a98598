"""Hugging Face DeepSeek-V2 / V3-family checkpoint → GGUF, streaming (FP8 weights dequantized with their block scales).

Weights are read through memory-mapped safetensors one slice at a time (one expert, or a block of rows of a
large matrix), quantized and appended to the output, so peak memory stays at one slice plus a constant
whatever the model size. The GGUF header (metadata and every tensor's type, shape and offset) is known from
the plan before any weight is read, so it is written first and the data follows in the same order.

The output is written to a temporary file beside it and renamed on success: a failure of any kind (bad
weights, a full disk, Ctrl-C) leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from lite import fp8
from lite.config import ARCH, add_metadata, gguf_metadata_from_hf
from lite.convert_plan import Checkpoint, PlannedTensor, file_type, open_checkpoint, plan, resolve_types
from lite.errors import LiteError
from lite.gguf_names import build_tensor
from quant.formats import quantize

Q = gguf.GGMLQuantizationType
CHUNK_ELEMENTS = 1 << 24  # ≤ 64 MiB of float32 per slice of a large matrix
Progress = Callable[[int, int, str], None]  # (input bytes done, input bytes total, current tensor name)

__all__ = ["convert", "ConvertSummary"]


@dataclass
class ConvertSummary:
    """What `convert` did (or, for a dry run, would do)."""

    out_path: Path
    dry_run: bool
    tensors: list[PlannedTensor]
    file_type: gguf.LlamaFileType
    input_bytes: int  # safetensors files on disk
    output_bytes: int  # the GGUF file (estimated for a dry run)
    seconds: float
    tokenizer: bool  # whether tokenizer metadata and the chat template were written
    notes: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def data_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tensors)

    @property
    def overall_bpw(self) -> float:
        return 8.0 * self.data_bytes / max(1, self.n_params)

    @property
    def expert_bpw(self) -> float | None:
        experts = [t for t in self.tensors if t.role == "expert"]
        if not experts:
            return None
        return 8.0 * sum(t.out_bytes for t in experts) / sum(t.n_elements for t in experts)

    @property
    def fallbacks(self) -> list[tuple[str, str, str]]:
        """(tensor, wanted type, written type) where rows did not fit the wanted type's block size."""
        return [(t.name, t.wanted.name, t.qtype.name) for t in self.tensors if t.qtype != t.wanted]

    @property
    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t.qtype.name for t in self.tensors))


def convert(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    outtype: str | None = None,
    experts: str | None = None,
    rest: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    legacy_kv_b: bool = False,
) -> ConvertSummary:
    """Convert the HF checkpoint in `hf_dir` to a GGUF at `out_path`.

    Recipe (default): routed experts Q4_K (Q4_0 where rows are not a multiple of 256), other matrices Q8_0,
    norms and the router F32. `experts` / `rest` pick other types, `outtype` one type for all weights
    ("f32" gives an exact file). `legacy_kv_b` writes the older single `attn_kv_b` layout (for tests).
    Raises LiteError, leaving no file behind, on bad input, bad weights or any OSError (a full disk, a
    read-only file system, a permission).
    """
    out = Path(out_path)
    try:
        return _convert(hf_dir, out, outtype, experts, rest, force, dry_run, progress, legacy_kv_b)
    except OSError as e:
        raise _os_error(e, out) from None


def _os_error(e: OSError, out: Path) -> LiteError:
    """One line for an OSError: what could not be read or written, why, and the fix."""
    name = os.fspath(e.filename) if e.filename is not None else None
    reason = e.strerror or str(e) or type(e).__name__
    where, p = out.resolve().parent, Path(name).resolve() if name else None
    writing = p is None or p in (where, where / out.name) or (p.parent == where and p.name.startswith(f".{out.name}."))
    if not writing:  # the checkpoint (config, safetensors, tokenizer files)
        return LiteError(f"cannot read {name}: {reason}; check the checkpoint folder and its permissions")
    if e.errno == errno.ENOSPC:
        return LiteError(f"disk full while writing {out}; free some space or write elsewhere with -o")
    why, fix = {
        errno.EROFS: ("the file system is read-only", "write elsewhere with -o"),
        errno.EACCES: ("permission denied", "write elsewhere with -o, or fix the folder's permissions"),
        errno.EPERM: ("operation not permitted", "write elsewhere with -o, or fix the folder's permissions"),
    }.get(e.errno or 0, (reason, "write elsewhere with -o"))
    return LiteError(f"cannot write {out}: {why}; {fix}")


def _convert(
    hf_dir: str | os.PathLike[str],
    out: Path,
    outtype: str | None,
    experts: str | None,
    rest: str | None,
    force: bool,
    dry_run: bool,
    progress: Progress | None,
    legacy_kv_b: bool,
) -> ConvertSummary:
    t0 = time.perf_counter()
    expert_type, rest_type = resolve_types(outtype, experts, rest)
    ckpt = open_checkpoint(hf_dir)
    tensors = plan(ckpt, expert_type, rest_type, legacy_kv_b=legacy_kv_b)
    _check_output(out, force or dry_run)
    ftype = file_type(tensors)
    writer = gguf.GGUFWriter(None, ARCH)
    notes = _add_metadata(writer, ckpt, ftype, legacy_kv_b)
    has_tokenizer = _add_tokenizer(writer, ckpt.path, notes)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.out_bytes, raw_dtype=t.qtype)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    data_bytes = sum(gguf.GGUFWriter.ggml_pad(t.out_bytes, writer.data_alignment) for t in tensors)
    estimate = _header_bytes(writer) + data_bytes
    summary = ConvertSummary(out, dry_run, tensors, ftype, ckpt.input_bytes, estimate, 0.0, has_tokenizer, notes)
    if not dry_run:
        free = shutil.disk_usage(out.parent).free
        if free < estimate:
            raise LiteError(
                f"not enough disk space in {out.parent}: the GGUF needs {estimate / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB are free; free some space or write elsewhere with -o"
            )
        _write(writer, ckpt, tensors, out, progress)
        summary.output_bytes = out.stat().st_size
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_output(out: Path, force: bool) -> None:
    if out.is_dir():
        raise LiteError(f"output {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise LiteError(f"output folder {out.parent} does not exist; create it or choose another -o")
    if out.exists() and not force:
        raise LiteError(f"{out} already exists; pass --force to overwrite it or choose another -o")


def _add_metadata(writer: gguf.GGUFWriter, ckpt: Checkpoint, ftype: gguf.LlamaFileType, legacy: bool) -> list[str]:
    """general.* and deepseek2.* keys, as llama.cpp's converter writes them."""
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
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return notes


def _add_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, notes: list[str]) -> bool:
    if not (hf_dir / "tokenizer.json").is_file():
        # "none" (no tokens) lets llama.cpp load the file for token-id use, as its vocab-less models do
        writer.add_tokenizer_model("none")
        notes.append("no tokenizer.json: the GGUF has no tokenizer (token ids only; `lite chat` needs one)")
        return False
    try:
        from lite.tokenizer_gguf import add_tokenizer_metadata
    except ImportError:
        notes.append("tokenizer metadata writer unavailable: the GGUF has no tokenizer")
        return False
    add_tokenizer_metadata(writer, hf_dir)
    if gguf.Keys.Tokenizer.CHAT_TEMPLATE not in writer.kv_data[0]:
        notes.append("no chat template in tokenizer_config.json: `lite chat` will fall back to plain text")
    return True


def _header_bytes(writer: gguf.GGUFWriter) -> int:
    """Size of header + metadata + tensor infos, aligned (what precedes the tensor data)."""
    n = 24  # magic, version, tensor count, kv count
    for key, val in writer.kv_data[0].items():
        n += len(writer._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False))
        n += len(writer._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type))
    for name, ti in writer.tensors[0].items():
        n += 8 + len(name.encode()) + 4 + 8 * len(ti.shape) + 4 + 8
    return gguf.GGUFWriter.ggml_pad(n, writer.data_alignment)


def _write(
    writer: gguf.GGUFWriter, ckpt: Checkpoint, tensors: list[PlannedTensor], out: Path, progress: Progress | None
) -> None:
    """Header, then each tensor's data in plan order, into a temporary file renamed to `out` on success."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    total, done = sum(t.in_bytes for t in tensors), 0
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for t in tensors:
            _pad(fout, writer.data_alignment)
            written = 0
            for x, in_bytes in _slices(ckpt, t):
                raw = quantize(x, t.qtype)
                _write_chunk(fout, raw)
                written += raw.nbytes
                done += in_bytes
                if progress:
                    progress(done, total, t.name)
            assert written == t.out_bytes, (t.name, written, t.out_bytes)
        _pad(fout, writer.data_alignment)
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.replace(tmp, out)
    finally:  # any failure, Ctrl+C, or SIGTERM/SIGHUP (the CLI turns them into exceptions): no partial file
        try:
            writer.close()
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _pad(fout, alignment: int) -> None:
    n = -fout.tell() % alignment
    if n:
        _write_chunk(fout, np.zeros(n, dtype=np.uint8))


def _write_chunk(fout, raw: np.ndarray) -> None:
    fout.write(memoryview(np.ascontiguousarray(raw).reshape(-1).view(np.uint8)))


def _slices(ckpt: Checkpoint, t: PlannedTensor) -> Iterator[tuple[np.ndarray, int]]:
    """The tensor's float32 data in row order, in slices of at most about CHUNK_ELEMENTS, with input bytes each.

    Each shard is opened (memory-mapped) for this tensor only, so pages read stay mapped one tensor at most.
    FP8 weights are dequantized slice by slice with the matching rows of their block scales.
    """
    kind, sources = t.src.kind, t.src.sources
    with ExitStack() as stack:
        files: dict[Path, Any] = {}

        def read(name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
            """Rows [r0, r1) of a source (all of it for None), dequantized if it is fp8."""
            shard = ckpt.shard_of[name]
            if shard not in files:
                files[shard] = stack.enter_context(safe_open(str(shard), framework="pt"))
            sl = files[shard].get_slice(name)
            x = sl[:] if rows is None else sl[rows[0] : rows[1]]
            scale = ckpt.scales.get(name)
            if scale is not None:
                x = fp8.dequantize(x, read(scale), ckpt.fp8_block, 0 if rows is None else rows[0])
            return x

        share = t.in_bytes // max(1, len(sources))
        if kind == "stack":  # one expert at a time: [out, in] each, stacked along the first axis
            for s in sources:
                yield _finite(read(s), s), share
        elif kind in ("k_b", "v_b"):  # small: split the whole kv_b
            s = sources[0]
            yield _finite(build_tensor(t.src, [read(s)], ckpt.args), s), t.in_bytes
        elif kind in ("fused_gate", "fused_up"):  # transformers-5 fused [n_expert, 2·inter, hidden]
            s = sources[0]
            n_exp = t.shape[0]
            for e in range(n_exp):
                gate, up = read(s, (e, e + 1))[0].chunk(2, dim=0)
                yield _finite(gate if kind == "fused_gate" else up, s), t.in_bytes // (2 * n_exp)
        elif kind == "copy":
            s = sources[0]
            shape = t.shape
            if len(shape) <= 1:
                yield _finite(read(s), s), t.in_bytes
                return
            row = int(np.prod(shape[1:]))
            step = max(1, CHUNK_ELEMENTS // row)
            for r in range(0, shape[0], step):
                n = min(step, shape[0] - r)
                yield _finite(read(s, (r, r + n)), s), t.in_bytes * n // shape[0]
        else:
            raise ValueError(f"unknown tensor kind {kind!r}")


def _finite(x: torch.Tensor, source: str) -> np.ndarray:
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise LiteError(f"weight {source} contains NaN or Inf; the checkpoint is corrupt: re-download or fix it")
    return x.contiguous().numpy()
