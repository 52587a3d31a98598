"""A Hugging Face DeepSeek-V2 / V3-family checkpoint (FP8 too), or a deepseek2 GGUF, → GGUF in a recipe's types.

Weights are read one slice at a time (one expert, or a block of rows of a large matrix; `sources.py`),
checked for NaN/Inf, quantized (`quant.formats.quantize`: llama.cpp's reference quantizers, native and
multi-threaded) and appended to the output, so peak memory stays at one slice plus a constant whatever the model
size. The GGUF header (metadata and every tensor's type, shape and offset) is known from the plan before any
weight is read, so it is written first and the data follows in the same order.

The output is written to a temporary file beside it and renamed on success: a failure of any kind (bad
weights, a full disk, Ctrl-C, SIGTERM) leaves no partial file and no temporary file behind, and an existing
output (overwritten only with `force`) stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from lite.config import ARCH
from lite.convert.plan import PlannedTensor, file_type, open_checkpoint, plan, resolve_overrides
from lite.convert.sources import (
    Slice,
    add_gguf_metadata,
    add_hf_metadata,
    add_hf_tokenizer,
    gguf_slices,
    hf_slices,
    open_gguf_input,
    plan_gguf,
)
from lite.errors import LiteError
from quant.finite import nonfinite
from quant.formats import quantize
from quant.native import all_finite

Q = gguf.GGMLQuantizationType
CHUNK_ELEMENTS = 1 << 24  # ≤ 64 MiB of float32 per slice of a large matrix

__all__ = ["convert", "ConvertProgress", "ConvertSummary"]


@dataclass
class ConvertProgress:
    """Where a conversion is, after each slice written."""

    tensors_done: int
    tensors_total: int
    bytes_done: int  # input bytes
    bytes_total: int
    name: str  # the tensor being written


Progress = Callable[[ConvertProgress], None]


@dataclass
class ConvertSummary:
    """What `convert` did (or, for a dry run, would do)."""

    out_path: Path
    dry_run: bool
    tensors: list[PlannedTensor]
    file_type: gguf.LlamaFileType
    input_bytes: int  # safetensors files or the input GGUF on disk
    output_bytes: int  # the GGUF file (estimated for a dry run)
    seconds: float
    tokenizer: bool  # whether tokenizer metadata (and a chat template) is in the output
    recipe: str = "lite"
    input_kind: str = "hf"  # "hf" | "gguf"
    peak_rss_bytes: int = 0  # the process's peak resident memory when done
    nonfinite: list[str] = field(default_factory=list)  # tensors written with NaN/Inf (allow_nonfinite)
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
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    recipe: str | None = None,
    outtype: str | None = None,
    experts: str | None = None,
    rest: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
    legacy_kv_b: bool = False,
) -> ConvertSummary:
    """Convert `source` (an HF checkpoint folder, or a deepseek2 GGUF in F32/F16/BF16/Q8_0) to a GGUF at `out_path`.

    `recipe` picks every tensor's type (`recipes.py`: "lite", the default, or llama.cpp's "q4_k_m",
    "q5_k_m", "q6_k", "q8_0"); `experts` / `rest` override it for the routed experts / the other matrices,
    `outtype` for all weights ("f32" from an HF folder gives an exact file). NaN or Inf in a weight is an error
    naming the tensor unless `allow_nonfinite`. `legacy_kv_b` writes the older single `attn_kv_b` layout (tests).
    Raises LiteError, leaving no file behind, on bad input, bad weights or any OSError (a full disk, a
    read-only file system, a permission).
    """
    out = Path(out_path)
    try:
        return _convert(Path(source), out, (recipe, outtype, experts, rest), force, dry_run, allow_nonfinite,
                        progress, legacy_kv_b)  # fmt: skip
    except OSError as e:
        raise _os_error(e, out) from None


def _os_error(e: OSError, out: Path) -> LiteError:
    """One line for an OSError: what could not be read or written, why, and the fix."""
    name = os.fspath(e.filename) if e.filename is not None else None
    reason = e.strerror or str(e) or type(e).__name__
    where, p = out.resolve().parent, Path(name).resolve() if name else None
    writing = p is None or p in (where, where / out.name) or (p.parent == where and p.name.startswith(f".{out.name}."))
    if not writing:  # the input (config, safetensors, tokenizer files, the GGUF)
        return LiteError(f"cannot read {name}: {reason}; check the input and its permissions")
    if e.errno == errno.ENOSPC:
        return LiteError(f"disk full while writing {out}; free some space or write elsewhere with -o")
    why, fix = {
        errno.EROFS: ("the file system is read-only", "write elsewhere with -o"),
        errno.EACCES: ("permission denied", "write elsewhere with -o, or fix the folder's permissions"),
        errno.EPERM: ("operation not permitted", "write elsewhere with -o, or fix the folder's permissions"),
    }.get(e.errno or 0, (reason, "write elsewhere with -o"))
    return LiteError(f"cannot write {out}: {why}; {fix}")


def _convert(
    source: Path,
    out: Path,
    choice: tuple[str | None, str | None, str | None, str | None],
    force: bool,
    dry_run: bool,
    allow_nonfinite: bool,
    progress: Progress | None,
    legacy_kv_b: bool,
) -> ConvertSummary:
    t0 = time.perf_counter()
    recipe, overrides = resolve_overrides(*choice)
    writer = gguf.GGUFWriter(None, ARCH)
    notes: list[str] = []
    slices: Callable[[PlannedTensor], Iterator[Slice]]
    if source.is_file():  # a GGUF
        f = open_gguf_input(source)
        tensors = plan_gguf(f, recipe, overrides)
        _check_output(out, force or dry_run)
        ftype = file_type(tensors, recipe, overrides)
        add_gguf_metadata(writer, f)
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        has_tokenizer = "tokenizer.ggml.tokens" in f.metadata
        input_bytes, kind = os.path.getsize(source), "gguf"

        def slices(t: PlannedTensor) -> Iterator[Slice]:
            return gguf_slices(f, t, CHUNK_ELEMENTS)
    else:
        ckpt = open_checkpoint(source)
        tensors = plan(ckpt, recipe, overrides, legacy_kv_b=legacy_kv_b)
        _check_output(out, force or dry_run)
        ftype = file_type(tensors, recipe, overrides)
        notes = add_hf_metadata(writer, ckpt, legacy_kv_b)
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        has_tokenizer = add_hf_tokenizer(writer, ckpt.path, notes)
        input_bytes, kind = ckpt.input_bytes, "hf"

        def slices(t: PlannedTensor) -> Iterator[Slice]:
            return hf_slices(ckpt, t, CHUNK_ELEMENTS)

    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.out_bytes, raw_dtype=t.qtype)
    if kind == "hf":
        writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    data_bytes = sum(gguf.GGUFWriter.ggml_pad(t.out_bytes, writer.data_alignment) for t in tensors)
    estimate = _header_bytes(writer) + data_bytes
    summary = ConvertSummary(out, dry_run, tensors, ftype, input_bytes, estimate, 0.0, has_tokenizer, recipe, kind)
    summary.notes = notes
    if not dry_run:
        free = shutil.disk_usage(out.parent).free
        if free < estimate:
            raise LiteError(
                f"not enough disk space in {out.parent}: the GGUF needs {estimate / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB are free; free some space or write elsewhere with -o"
            )
        summary.nonfinite = _write(writer, tensors, slices, out, progress, allow_nonfinite)
        summary.output_bytes = out.stat().st_size
        if summary.nonfinite:
            summary.notes.append(f"{len(summary.nonfinite)} tensors hold NaN or Inf (--allow-nonfinite)")
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return summary


def _check_output(out: Path, force: bool) -> None:
    if out.is_dir():
        raise LiteError(f"output {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise LiteError(f"output folder {out.parent} does not exist; create it or choose another -o")
    if out.exists() and not force:
        raise LiteError(f"{out} already exists; pass --force to overwrite it or choose another -o")


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
    writer: gguf.GGUFWriter,
    tensors: list[PlannedTensor],
    slices: Callable[[PlannedTensor], Iterator[Slice]],
    out: Path,
    progress: Progress | None,
    allow_nonfinite: bool,
) -> list[str]:
    """Header, then each tensor's data in plan order, into a temporary file renamed to `out` on success.
    Returns the tensors that held NaN or Inf (only with allow_nonfinite; otherwise that is an error)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    total, done, bad = sum(t.in_bytes for t in tensors), 0, []
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None  # write_header_to_file opened it
        fout = writer.fout[0]
        for i, t in enumerate(tensors):
            _pad(fout, writer.data_alignment)
            written = 0
            for sl in slices(t):
                raw, finite = _encode(sl, t)
                if not finite:
                    if not allow_nonfinite:
                        also = f" (GGUF tensor {t.name})" if sl.source != t.name else ""
                        raise LiteError(
                            f"weight {sl.source} contains NaN or Inf{also}; the input is corrupt: re-download or fix "
                            "it, or pass --allow-nonfinite to write it anyway"
                        )
                    if t.name not in bad:
                        bad.append(t.name)
                _write_chunk(fout, raw)
                written += raw.nbytes
                done += sl.in_bytes
                if progress:
                    progress(ConvertProgress(i, len(tensors), done, total, t.name))
            assert written == t.out_bytes, (t.name, written, t.out_bytes)
            if progress:
                progress(ConvertProgress(i + 1, len(tensors), done, total, t.name))
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
    return bad


def _encode(sl: Slice, t: PlannedTensor) -> tuple[np.ndarray, bool]:
    """The slice's bytes in the tensor's type, and whether its values are all finite."""
    if sl.raw is not None:  # already in the output type: copied
        mask = nonfinite(sl.raw, t.qtype)
        return sl.raw, mask is None or not bool(mask.any())
    x = sl.x
    assert x is not None
    return quantize(x, t.qtype), all_finite(x)


def _pad(fout, alignment: int) -> None:
    n = -fout.tell() % alignment
    if n:
        _write_chunk(fout, np.zeros(n, dtype=np.uint8))


def _write_chunk(fout, raw: np.ndarray) -> None:
    fout.write(np.ascontiguousarray(raw).reshape(-1).view(np.uint8).data)
