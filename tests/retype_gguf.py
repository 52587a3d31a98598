"""Rewrite a GGUF with other types for some tensors (tests: the mixed per-layer types of llama.cpp's Q4_K_M files)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from quant.formats import dequantize
from quant.gguf_file import GGUFFile, TensorRef

Q = gguf.GGMLQuantizationType


def _quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.Q4_K:  # gguf cannot quantize K-quants; lite's reference quantizer can
        from quant.formats import quantize

        return quantize(x, qtype)
    return gguf.quants.quantize(x, qtype)


def retype(
    src: str | Path, out: str | Path, choose: Callable[[TensorRef], Q | None], extra: dict | None = None
) -> Path:
    """Copy `src` to `out`; a tensor for which `choose(ref)` names a type is requantized to it. `extra`: more
    metadata (floats as float32, ints as int32, strings)."""

    def replace(ref: TensorRef) -> tuple[Q, np.ndarray] | None:
        qtype = choose(ref)
        if qtype is None or qtype == ref.qtype:
            return None
        x = dequantize(ref.data, ref.qtype, ref.shape).numpy()
        return qtype, _quantize(x.reshape(-1, ref.shape[-1]), qtype)

    return rewrite(src, out, replace, extra)


def rewrite(
    src: str | Path,
    out: str | Path,
    replace: Callable[[TensorRef], tuple[Q, np.ndarray] | None],
    extra: dict | None = None,
) -> Path:
    """Copy `src` to `out`; a tensor for which `replace(ref)` gives (type, raw bytes) is written as those bytes."""
    f = GGUFFile(src)
    arch = f.metadata["general.architecture"]
    w = gguf.GGUFWriter(str(out), arch)
    for key, field in f.reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.metadata[key], vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, f.metadata[key], vtype)
    for key, value in (extra or {}).items():
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, int):
            w.add_int32(key, value)
        else:
            w.add_string(key, value)
    for name, ref in f.tensors.items():
        new = replace(ref)
        qtype, raw = new if new is not None else (ref.qtype, np.array(ref.data))
        if qtype in (Q.F32, Q.F16):
            dt = np.float32 if qtype == Q.F32 else np.float16
            w.add_tensor(name, raw.view(dt).reshape(ref.shape))
        else:
            row_bytes = raw.size // int(np.prod(ref.shape[:-1], dtype=np.int64))
            w.add_tensor(name, raw.reshape(*ref.shape[:-1], row_bytes), raw_shape=(*ref.shape[:-1], row_bytes),
                         raw_dtype=qtype)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return Path(out)
