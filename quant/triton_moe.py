"""Triton grouped-expert (MoE) kernels over a pool of raw GGUF experts, and the device-side grouping of tokens.

Imported lazily by `quant.device_kernels` (needs triton). `moe` computes, for T tokens with k chosen experts each,

    out[t] = sum_j weights[t, j] * down(silu(gate(x[t])) * up(x[t])),   expert = pool[slots[t, j]]

in four steps, all queued on the device without a device-to-host sync:

1. `align_by_slot`: the T*k (token, choice) pairs, numbered p = t*k + j, are sorted by pool slot and each slot's run
   is padded to a multiple of BLOCK_M, so every BLOCK_M-row block of the sorted order belongs to one expert (as
   vLLM's moe_align_block_size). Shapes come only from T, k, n_slots and BLOCK_M: the padded length is bounded by
   T*k + min(T*k, n_slots) * (BLOCK_M - 1), grids are sized by that bound, and the real padded length stays in a
   device tensor that each program reads to exit early when its block lies past the end.
2. `moe_gate_up_kernel`, one launch for all experts: per (M-block, N-tile of `inter`), gate and up tiles are
   dequantized in the same K loop over the block's gathered x rows, and the epilogue stores
   H[p] = silu(gate) * up (float32).
3. `moe_down_kernel`, a second launch: O[p] = weights[p] * (H[p] @ down.T) (float32). It cannot be fused into the
   first launch: down's K dimension is all of `inter`, while the gate/up launch splits `inter` across programs.
   Fusing would need either a grid-wide barrier, or each program recomputing the whole gate/up row (inter/BLOCK_N
   times the work), or float atomics into the output (whose summation order, hence result, varies run to run).
4. out[t] = O[t*k] + O[t*k + 1] + ... + O[t*k + k-1], added in that order in float32 and cast to x's dtype. Every
   float sum has a fixed order (no atomics), so results are deterministic; the caller orders each token's columns
   by expert id so that they also do not depend on the router's order.

Decode (T <= 8) uses BLOCK_M = 1 and the GEMV form (`triton_blocks.gemv`: whole blocks per step, each weight byte
loaded once, no tl.dot): no padding at all, one program per (pair, N-tile). Larger T uses tl.dot with BLOCK_M 16..64
by the mean number of rows per expert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gguf
import torch
import triton
import triton.language as tl

from quant.triton_blocks import (
    GEMV_THREADS,
    INTERPRETED,
    accumulate,
    aligned_rows,
    block_elems,
    dequant_tile,
    gemv,
    gemv_tiles,
    gemv_weights_per_thread,
    row_bytes,
)

if TYPE_CHECKING:
    from quant.device_kernels import ExpertSpec

DECODE_MAX_TOKENS = 8


@triton.jit
def _block_rows(sorted_ids_ptr, block_slot_ptr, total_ptr, pool_ptr, n_pairs, slot_bytes, BLOCK_M: tl.constexpr):
    """This M-block's expert (uint8 pointer to its slot), pair ids [BLOCK_M] and their validity; `live` is false
    for blocks past the real padded length, which must do nothing."""
    pid_m = tl.program_id(1)
    live = pid_m * BLOCK_M < tl.load(total_ptr)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    expert = pool_ptr + slot * slot_bytes
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # padding holds n_pairs
    return live, expert, pair, pair < n_pairs


@triton.jit
def moe_gate_up_kernel(
    x_ptr,
    pool_ptr,
    h_ptr,
    sorted_ids_ptr,
    block_slot_ptr,
    total_ptr,
    n_pairs,
    top_k,
    hidden,
    inter,
    stride_x,
    slot_bytes,
    gate_offset,
    up_offset,
    gate_row_bytes,
    up_row_bytes,
    GATE_TYPE: tl.constexpr,
    UP_TYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """Grid (cdiv(inter, BLOCK_N), padded bound / BLOCK_M). H[p, n] = silu(x[p // k] . gate[n]) * (x[p // k] . up[n]),
    for the pairs p of the block. USE_DOT False (decode): BLOCK_M is 1 and each matrix goes through
    triton_blocks.gemv (whole blocks per step, each weight byte loaded once)."""
    live, expert, pair, valid = _block_rows(
        sorted_ids_ptr, block_slot_ptr, total_ptr, pool_ptr, n_pairs, slot_bytes, BLOCK_M
    )
    if live:
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < inter
        rc = tl.minimum(rn, inter - 1)  # rows past the end repeat the last one (not stored)
        gate_rows = aligned_rows(expert + gate_offset, rc, gate_row_bytes, GATE_TYPE)
        up_rows = aligned_rows(expert + up_offset, rc, up_row_bytes, UP_TYPE)
        if USE_DOT:
            x_rows = x_ptr + (pair // top_k).to(tl.int64) * stride_x
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows[:, None] + kk[None, :], mask=valid[:, None] & (kk < hidden)[None, :], other=0.0)
                x = x.to(tl.float32)
                acc_g = accumulate(
                    acc_g, x, dequant_tile(gate_rows, nmask, k0, hidden, GATE_TYPE, BLOCK_N, BLOCK_K), USE_DOT
                )
                acc_u = accumulate(
                    acc_u, x, dequant_tile(up_rows, nmask, k0, hidden, UP_TYPE, BLOCK_N, BLOCK_K), USE_DOT
                )
        else:
            tl.static_assert(BLOCK_M == 1, "the GEMV form takes one pair per program")
            p0 = tl.load(sorted_ids_ptr + tl.program_id(1))  # a real pair: BLOCK_M = 1 pads nothing
            x_row = x_ptr + (p0 // top_k).to(tl.int64) * stride_x
            acc_g = gemv(x_row, stride_x, 1, gate_rows, hidden, GATE_TYPE, 1, BLOCK_N, BLOCK_K)
            acc_u = gemv(x_row, stride_x, 1, up_rows, hidden, UP_TYPE, 1, BLOCK_N, BLOCK_K)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        out = h_ptr + pair.to(tl.int64)[:, None] * inter + rn[None, :]
        tl.store(out, h, mask=valid[:, None] & nmask[None, :])


@triton.jit
def moe_down_kernel(
    h_ptr,
    pool_ptr,
    o_ptr,
    weights_ptr,
    sorted_ids_ptr,
    block_slot_ptr,
    total_ptr,
    n_pairs,
    hidden,
    inter,
    slot_bytes,
    down_offset,
    down_row_bytes,
    DOWN_TYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """Grid (cdiv(hidden, BLOCK_N), padded bound / BLOCK_M). O[p, n] = weights[p] * (H[p] . down[n]).
    USE_DOT False (decode): BLOCK_M is 1, through triton_blocks.gemv."""
    live, expert, pair, valid = _block_rows(
        sorted_ids_ptr, block_slot_ptr, total_ptr, pool_ptr, n_pairs, slot_bytes, BLOCK_M
    )
    if live:
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < hidden
        down_rows = aligned_rows(expert + down_offset, tl.minimum(rn, hidden - 1), down_row_bytes, DOWN_TYPE)
        if USE_DOT:
            h_rows = h_ptr + pair.to(tl.int64) * inter
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                h = tl.load(h_rows[:, None] + kk[None, :], mask=valid[:, None] & (kk < inter)[None, :], other=0.0)
                acc = accumulate(
                    acc, h, dequant_tile(down_rows, nmask, k0, inter, DOWN_TYPE, BLOCK_N, BLOCK_K), USE_DOT
                )
        else:
            tl.static_assert(BLOCK_M == 1, "the GEMV form takes one pair per program")
            p0 = tl.load(sorted_ids_ptr + tl.program_id(1))  # a real pair: BLOCK_M = 1 pads nothing
            acc = gemv(h_ptr + p0.to(tl.int64) * inter, inter, 1, down_rows, inter, DOWN_TYPE, 1, BLOCK_N, BLOCK_K)
        rw = tl.load(weights_ptr + pair, mask=valid, other=0.0)
        out = o_ptr + pair.to(tl.int64)[:, None] * hidden + rn[None, :]
        tl.store(out, acc * rw[:, None], mask=valid[:, None] & nmask[None, :])


def align_by_slot(slots: torch.Tensor, n_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the pairs p (flattened `slots`, int64 [P]) by slot, each group padded to a multiple of block_m.

    Returns sorted_ids int32 [n_blocks * block_m] (pair ids in slot order, stable within a slot; padding = P),
    block_slot int64 [n_blocks] (the slot of each M-block; blocks past the end hold a valid dummy) and total int64 [1]
    (the padded length actually used). n_blocks is the host-side bound; nothing here waits for the device, and
    nothing uses atomics (a stable sort and binary searches), so the grouping is deterministic.
    """
    p = slots.numel()
    dev = slots.device
    n_blocks = triton.cdiv(p + min(p, n_slots) * (block_m - 1), block_m)
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots[order]
    first = torch.searchsorted(sorted_slots, torch.arange(n_slots + 1, device=dev))  # where each slot's run starts
    counts = first.diff()
    padded = (counts + (block_m - 1)) // block_m * block_m
    ends = torch.cumsum(padded, 0)  # padded end of each slot's group
    dest = (ends - padded - first[:-1])[sorted_slots] + torch.arange(p, device=dev)
    sorted_ids = torch.full((n_blocks * block_m,), p, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(n_blocks, device=dev) * block_m
    block_slot = torch.searchsorted(ends, block_start, right=True).clamp_(max=n_slots - 1)
    return sorted_ids, block_slot, ends[-1:]


def moe_config(tokens: int, pairs: int, n_slots: int) -> tuple[int, bool]:
    """(BLOCK_M, USE_DOT). Untuned guesses: GEMV per pair for decode, else a tile near the mean rows per expert."""
    if tokens <= DECODE_MAX_TOKENS:
        return 1, False
    mean = pairs / min(pairs, n_slots)
    return (16 if mean <= 16 else 32 if mean <= 32 else 64), True


def tiles(
    use_dot: bool, interpreter_tiles: bool, qtypes: tuple[gguf.GGMLQuantizationType, ...], n: int, k: int, pairs: int
) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of a kernel over matrices of these types (n rows of k columns each), for `pairs` M-blocks.
    Untuned guesses for the GPU: the tl.dot form keeps BLOCK_K at 32 (larger K tiles spill registers, see
    triton_blocks.gemm_config); the GEMV form (one pair per program) takes triton_blocks.gemv_tiles of each type, the
    smallest of each (BLOCK_K at least every type's block), with enough programs counting all pairs. Triton's CPU
    interpreter, whose cost is per operation rather than per element, gets large tiles: fewer programs and K steps
    (the same code, other constexpr sizes)."""
    bk = max(128, *(block_elems(q) for q in qtypes))
    if interpreter_tiles:
        return 128, max(bk, 256)
    if use_dot:
        return 64 // len(qtypes), 32  # gate+up: two accumulators, half the width
    per_thread = gemv_weights_per_thread(1)
    shapes = [gemv_tiles(q, n * pairs, k, per_thread) for q in qtypes]
    bn = min(s[0] for s in shapes)
    bk = max(min(s[1] for s in shapes), *(block_elems(q) for q in qtypes))
    while bn > 1 and any(bn * bk // max(block_elems(q), 32) >= GEMV_THREADS for q in qtypes):
        bn //= 2  # fewer blocks per step than threads for every type (see gemv_tiles)
    return bn, bk


def moe(
    x: torch.Tensor,
    pool: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    spec: ExpertSpec,
    interpreter_tiles: bool | None = None,
) -> torch.Tensor:
    """See the module docstring; arguments already checked by quant.device_kernels.moe_ffn. interpreter_tiles:
    as in triton_blocks.matmul (False: the GPU's tile sizes, for tests under the interpreter)."""
    big = INTERPRETED if interpreter_tiles is None else interpreter_tiles
    t, k = slots.shape
    hidden, inter = spec.hidden, spec.inter
    dev = x.device
    if t == 0 or k == 0:
        return torch.zeros(t, hidden, dtype=x.dtype, device=dev)
    p = t * k
    n_slots = pool.shape[0]
    block_m, use_dot = moe_config(t, p, n_slots)
    sorted_ids, block_slot, total = align_by_slot(slots.reshape(-1).to(torch.int64), n_slots, block_m)
    n_blocks = block_slot.numel()
    h = torch.empty(p, inter, dtype=torch.float32, device=dev)
    o = torch.empty(p, hidden, dtype=torch.float32, device=dev)
    rw = weights.to(torch.float32).contiguous()

    bn, bk = tiles(use_dot, big, (spec.gate_type, spec.up_type), inter, hidden, p)
    moe_gate_up_kernel[(triton.cdiv(inter, bn), n_blocks)](
        x, pool, h, sorted_ids, block_slot, total, p, k, hidden, inter, x.stride(0), pool.stride(0),
        spec.gate_offset, spec.up_offset, row_bytes(spec.gate_type, hidden), row_bytes(spec.up_type, hidden),
        GATE_TYPE=int(spec.gate_type), UP_TYPE=int(spec.up_type),
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, num_warps=4,
    )  # fmt: skip
    bn, bk = tiles(use_dot, big, (spec.down_type,), hidden, inter, p)
    moe_down_kernel[(triton.cdiv(hidden, bn), n_blocks)](
        h, pool, o, rw, sorted_ids, block_slot, total, p, hidden, inter, pool.stride(0),
        spec.down_offset, row_bytes(spec.down_type, inter),
        DOWN_TYPE=int(spec.down_type), BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, num_warps=4,
    )  # fmt: skip

    o = o.view(t, k, hidden)
    out = o[:, 0]
    for j in range(1, k):
        out = out + o[:, j]
    return out.to(x.dtype).contiguous()
