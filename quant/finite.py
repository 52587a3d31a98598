"""NaN/Inf in weights, found at load (a corrupt or badly converted file) instead of as garbage output.

Exact and cheap: in every block format lite reads, a value is an fp16 scale (and minimum) times small
integers, so a block holds NaN or Inf exactly when one of its fp16 scales does; F32/F16/BF16 values are
tested by their exponent bits. Nothing is dequantized.

What is checked: every 1-D tensor (norms) and every tensor of at most `FULL_CHECK_ELEMENTS` values, whole (one
pass); larger weights are *sampled*: `SAMPLE_ROWS` rows spread evenly over the tensor (across all experts of a
stack), so a large file costs a few page reads per tensor. A NaN that sampling misses still cannot pass
silently: `lite.generate.Session.feed` refuses non-finite logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import gguf
import numpy as np

from quant.errors import LiteError
from quant.gguf_file import TensorRef

Q = gguf.GGMLQuantizationType
FULL_CHECK_ELEMENTS = 1 << 20  # tensors up to this many values are checked whole
SAMPLE_ROWS = 8  # rows checked of each larger tensor
# block format -> (byte offset of its fp16 scales in a block, how many): d; d and m; d and dmin; Q6_K's d is last
SCALES = {
    Q.Q8_0: (0, 1), Q.Q4_0: (0, 1), Q.Q4_1: (0, 2), Q.Q5_0: (0, 1), Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208, 1), Q.Q2_K: (80, 2), Q.Q3_K: (108, 1), Q.IQ4_NL: (0, 1),
    Q.IQ4_XS: (0, 1),
}  # fmt: skip
# float format -> (unsigned view, exponent mask): all exponent bits set means Inf or NaN
FLOATS = {Q.F32: ("<u4", 0x7F800000), Q.F16: ("<u2", 0x7C00), Q.BF16: ("<u2", 0x7F80)}


def nonfinite(rows: np.ndarray, qtype: Q) -> np.ndarray | None:
    """For raw rows uint8 [n, row bytes] of `qtype`: bool [n, k], True where a value (float types) or a block
    (block types) holds NaN or Inf; None for a type this check does not know."""
    if qtype in FLOATS:
        view, mask = FLOATS[qtype]
        return (rows.view(view) & mask) == mask
    if qtype not in SCALES:
        return None
    offset, count = SCALES[qtype]
    block = gguf.GGML_QUANT_SIZES[qtype][1]
    scales = np.ascontiguousarray(rows.reshape(rows.shape[0], -1, block)[:, :, offset : offset + 2 * count])
    return ((scales.view("<u2") & 0x7C00) == 0x7C00).any(axis=-1)  # [n, blocks]


def sample_rows(n_rows: int, n_elements: int, one_d: bool) -> np.ndarray | None:
    """Row indices to check, or None for all of them."""
    if one_d or n_elements <= FULL_CHECK_ELEMENTS or n_rows <= SAMPLE_ROWS:
        return None
    return np.unique(np.linspace(0, n_rows - 1, SAMPLE_ROWS).round().astype(np.int64))


def check_finite(tensors: Mapping[str, TensorRef], path: str = "the GGUF file") -> None:
    """Raise LiteError naming the first tensor found to hold NaN or Inf (see the module docstring for what is
    checked). Types this check does not know are skipped."""
    for t in tensors.values():
        if not t.shape or t.nbytes == 0:
            continue
        n_rows = t.n_elements // t.shape[-1]
        picked = sample_rows(n_rows, t.n_elements, len(t.shape) == 1)
        rows = t.data.reshape(n_rows, -1)
        bad = nonfinite(rows if picked is None else rows[picked], t.qtype)
        if bad is None or not bad.any():
            continue
        r, c = (int(i) for i in np.argwhere(bad)[0])
        if len(t.shape) > 1:
            where = f"row {r if picked is None else int(picked[r])}"
        else:
            where = f"value {c}" if t.qtype in FLOATS else f"block {c}"
        raise LiteError(
            f"{path}: tensor {t.name} holds NaN or Inf ({where}); the file is corrupt: download or convert it again"
        )
