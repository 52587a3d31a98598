"""The planner's numbers for the real DeepSeek-V2-Lite and DeepSeek-V2 shapes, from synthetic metadata (the sparse
full-size files of tests/full_size_gguf.py are planned in tests/test_planner_full_size.py)."""

from __future__ import annotations

from typing import NamedTuple

import gguf
import pytest
import torch

from lite.errors import LiteError
from offload.planner import STAGING_BUFFERS, GiB, make_plan, model_sizes, parse_size

Q = gguf.GGMLQuantizationType


class T(NamedTuple):
    qtype: Q
    shape: tuple[int, ...]
    nbytes: int


def nbytes(shape: tuple[int, ...], qtype: Q) -> T:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return T(qtype, shape, n // block * size)


def synthetic(
    layers: int,
    hidden: int,
    vocab: int,
    dense_ff: int,
    moe_ff: int,
    experts: int,
    used: int,
    shared: int,
    heads: int,
    q_lora: int | None,
    dense_q: Q = Q.Q8_0,
    kv_lora: int = 512,
    rope: int = 64,
    nope: int = 128,
    v: int = 128,
) -> tuple[dict, dict[str, T]]:
    """llama.cpp-style deepseek2 metadata and {tensor name: (qtype, shape, nbytes)}: experts Q4_K, other
    matrices `dense_q`, norms and routers F32."""
    meta = {
        "general.architecture": "deepseek2",
        "deepseek2.block_count": layers,
        "deepseek2.context_length": 163840,
        "deepseek2.embedding_length": hidden,
        "deepseek2.attention.kv_lora_rank": kv_lora,
        "deepseek2.rope.dimension_count": rope,
        "deepseek2.expert_count": experts,
        "deepseek2.expert_used_count": used,
        "deepseek2.leading_dense_block_count": 1,
    }
    t: dict[str, int] = {
        "token_embd.weight": nbytes((vocab, hidden), dense_q),
        "output.weight": nbytes((vocab, hidden), dense_q),
        "output_norm.weight": nbytes((hidden,), Q.F32),
    }
    for i in range(layers):
        b = f"blk.{i}"
        t[f"{b}.attn_norm.weight"] = t[f"{b}.ffn_norm.weight"] = nbytes((hidden,), Q.F32)
        if q_lora:
            t[f"{b}.attn_q_a.weight"] = nbytes((q_lora, hidden), dense_q)
            t[f"{b}.attn_q_a_norm.weight"] = nbytes((q_lora,), Q.F32)
            t[f"{b}.attn_q_b.weight"] = nbytes((heads * (nope + rope), q_lora), dense_q)
        else:
            t[f"{b}.attn_q.weight"] = nbytes((heads * (nope + rope), hidden), dense_q)
        t[f"{b}.attn_kv_a_mqa.weight"] = nbytes((kv_lora + rope, hidden), dense_q)
        t[f"{b}.attn_kv_a_norm.weight"] = nbytes((kv_lora,), Q.F32)
        t[f"{b}.attn_k_b.weight"] = nbytes((heads, kv_lora, nope), dense_q)
        t[f"{b}.attn_v_b.weight"] = nbytes((heads, v, kv_lora), dense_q)
        t[f"{b}.attn_output.weight"] = nbytes((hidden, heads * v), dense_q)
        if i == 0:
            for n, s in (("gate", (dense_ff, hidden)), ("up", (dense_ff, hidden)), ("down", (hidden, dense_ff))):
                t[f"{b}.ffn_{n}.weight"] = nbytes(s, dense_q)
            continue
        t[f"{b}.ffn_gate_inp.weight"] = nbytes((experts, hidden), Q.F32)
        sh = shared * moe_ff
        for n, s in (("gate", (sh, hidden)), ("up", (sh, hidden)), ("down", (hidden, sh))):
            t[f"{b}.ffn_{n}_shexp.weight"] = nbytes(s, dense_q)
        for n, s in (("gate", (moe_ff, hidden)), ("up", (moe_ff, hidden)), ("down", (hidden, moe_ff))):
            t[f"{b}.ffn_{n}_exps.weight"] = nbytes((experts, *s), Q.Q4_K)
    return meta, t


LITE = dict(
    layers=27,
    hidden=2048,
    vocab=102400,
    dense_ff=10944,
    moe_ff=1408,
    experts=64,
    used=6,
    shared=2,
    heads=16,
    q_lora=None,
)
V2 = dict(
    layers=60,
    hidden=5120,
    vocab=102400,
    dense_ff=12288,
    moe_ff=1536,
    experts=160,
    used=6,
    shared=2,
    heads=128,
    q_lora=1536,
    dense_q=Q.Q4_K,
)  # 4-bit attention: bf16 would be 24 GiB


# one Q4_K expert of V2-Lite in the file: 3 matrices of 1408 rows x 2048/256 blocks x 144 bytes = 4.87 MB; a device
# slot holds the same bytes (every tier keeps the GGUF blocks)
LITE_EXPERT = 3 * 1408 * 8 * 144


def test_lite_sizes_and_latent_cache():
    meta, tensors = synthetic(**LITE)
    s = model_sizes(meta, tensors)
    assert s.moe_layers == list(range(1, 27)) and s.n_experts == 64 and s.experts_per_token == 6
    assert s.expert_file_bytes == s.expert_bytes == LITE_EXPERT == 4_866_048
    assert s.expert_bytes_by_layer == s.expert_file_bytes_by_layer == dict.fromkeys(range(1, 27), LITE_EXPERT)
    assert s.slot_set_bytes == 26 * LITE_EXPERT and s.expert_total == s.expert_file_total == 26 * 64 * LITE_EXPERT
    # the embedding stays in RAM (the file's mmap): not part of the device's dense bytes
    assert s.embedding_bytes == tensors["token_embd.weight"].nbytes
    assert s.dense_bytes < sum(t.nbytes for n, t in tensors.items() if "_exps" not in n)
    # the example: 27 x 576 x 2 x 131072 bytes = 3.80 GiB
    assert s.latent_bytes(131072, 2) == 27 * 576 * 2 * 131072
    assert round(s.latent_bytes(131072, 2) / GiB, 2) == 3.80
    plan = make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=131072)
    assert plan.latent_bytes == 27 * 576 * 2 * 131072


def test_cuda_dense_bytes_are_gguf_bytes():
    """On CUDA a 2-D weight is its GGUF bytes; norms bf16, routers float32, attn_k_b/attn_v_b dense bf16."""
    meta, tensors = synthetic(**LITE)
    s = model_sizes(meta, tensors, 2, "cuda")
    want = 0
    for name, t in tensors.items():
        numel = 1
        for d in t.shape:
            numel *= d
        if "_exps" in name or name == "token_embd.weight":
            continue
        if "ffn_gate_inp" in name:
            want += numel * 4
        elif len(t.shape) == 1 or "attn_k_b" in name or "attn_v_b" in name:
            want += numel * 2
        else:
            want += t.nbytes
    assert s.dense_bytes == want
    # tied embeddings: the output matrix is the embedding, loaded on the device as well as mapped in RAM
    output = tensors.pop("output.weight")
    tied = model_sizes(meta, tensors, 2, "cuda")
    assert tied.dense_bytes == want - output.nbytes + tensors["token_embd.weight"].nbytes
    assert tied.embedding_bytes == tensors["token_embd.weight"].nbytes


def test_lite_on_8gb_gpu():
    s = model_sizes(*synthetic(**LITE))
    plan = make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=4096)
    reserve = min(GiB, s.dense_bytes // 8)
    free = 8 * GiB - s.dense_bytes - 27 * 576 * 2 * 4096 - reserve
    assert plan.slots_per_layer == free // (26 * LITE_EXPERT) < 64
    assert plan.experts_on == "ram" and plan.ram_expert_bytes == s.expert_file_total
    assert plan.staging_bytes == STAGING_BUFFERS * LITE_EXPERT
    assert plan.cache_bytes == plan.slots_per_layer * 26 * LITE_EXPERT
    assert plan.device_total <= 8 * GiB
    # everything fits a bigger card: experts_on auto becomes "device"
    assert make_plan(s, "cuda", gpu_memory="24GiB", ram_memory="32GiB", ctx=4096).experts_on == "device"


def test_v2_on_24gb_gpu_ram_or_disk():
    s = model_sizes(*synthetic(**V2))
    assert s.expert_file_bytes == s.expert_bytes == 3 * 1536 * 20 * 144
    assert len(s.moe_layers) == 59 and s.expert_total == 59 * 160 * s.expert_bytes
    assert s.latent_bytes(4096, 2) == 60 * 576 * 2 * 4096
    in_ram = make_plan(s, "cuda", gpu_memory="24GiB", ram_memory="192GiB", ctx=4096)
    assert in_ram.experts_on == "ram" and 6 <= in_ram.slots_per_layer < 160
    on_disk = make_plan(s, "cuda", gpu_memory="24GiB", ram_memory="64GiB", ctx=4096)
    assert on_disk.experts_on == "disk"
    # the whole RAM budget goes to the LRU: never halved; the pinned staging ring is counted beside it
    assert on_disk.ram_expert_bytes == on_disk.ram_budgeted == 64 * GiB
    assert on_disk.ram_total == 64 * GiB + on_disk.staging_bytes + s.embedding_bytes
    with pytest.raises(LiteError, match="experts_on=disk"):
        make_plan(s, "cuda", gpu_memory="24GiB", ram_memory="64GiB", ctx=4096, experts_on="ram")


def test_refusals_say_what_would_fit():
    s = model_sizes(*synthetic(**LITE))
    with pytest.raises(LiteError, match=r"ctx=\d+") as e:  # the dense part fits, the long context does not
        make_plan(s, "cuda", gpu_memory="4GiB", ram_memory="32GiB", ctx=131072)
    assert "\n" not in str(e.value)
    ctx = int(str(e.value).split("ctx=")[1].split(")")[0])
    make_plan(s, "cuda", gpu_memory="4GiB", ram_memory="32GiB", ctx=ctx)  # the suggestion works
    with pytest.raises(LiteError):
        make_plan(s, "cuda", gpu_memory="4GiB", ram_memory="32GiB", ctx=ctx + 1)
    with pytest.raises(LiteError, match="gpu_memory"):  # the library names its options; the CLI, its flags
        make_plan(s, "cuda", gpu_memory="1GiB", ram_memory="32GiB", ctx=4096)
    with pytest.raises(LiteError, match="experts_on=device"):
        make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=4096, experts_on="device")
    with pytest.raises(LiteError, match="ram_memory"):
        make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="40MiB", ctx=4096, experts_on="disk")
    # CPU: the latent cache and the experts share ram_memory
    with pytest.raises(LiteError, match=r"ctx=\d+.*ram_memory") as e:
        make_plan(s, "cpu", ram_memory="2GiB", ctx=131072, cache_dtype_bytes=4)
    ctx = int(str(e.value).split("ctx=")[1].split(")")[0])
    assert make_plan(s, "cpu", ram_memory="2GiB", ctx=ctx, cache_dtype_bytes=4).ram_budgeted <= 2 * GiB
    with pytest.raises(LiteError, match="ram_memory"):
        make_plan(s, "cpu", ram_memory="2GiB", ctx=4096, cache_dtype_bytes=4, experts_on="disk", expert_cache=64)


def test_cpu_budget_is_shared():
    """On CPU one budget holds the latent cache, the expert slots and the host tier (dense weights on top)."""
    s = model_sizes(*synthetic(**LITE), dtype_bytes=4, device="cpu")
    latent = s.latent_bytes(4096, 4)
    for ram in (GiB, 2 * GiB, 4 * GiB):
        plan = make_plan(s, "cpu", ram_memory=ram, ctx=4096, cache_dtype_bytes=4)
        assert plan.experts_on == "disk"
        assert plan.ram_budgeted == latent + plan.cache_bytes + plan.ram_expert_bytes <= ram
        assert plan.ram_total <= ram + s.dense_bytes + s.embedding_bytes + plan.reserve_bytes
        # slots: at most 2 x top-k per layer and at most half of what the latent cache leaves
        assert 1 <= plan.slots_per_layer <= 12 and plan.cache_bytes <= (ram - latent) // 2
        assert plan.ram_expert_bytes >= 12 * s.expert_bytes  # the LRU gets the rest
    plan = make_plan(s, "cpu", ram_memory="2GiB", ctx=4096, cache_dtype_bytes=4)
    assert plan.slots_per_layer == (2 * GiB - latent) // 2 // s.slot_set_bytes == 7
    # room for every expert: all resident, the mmap itself (no slot copies, no LRU)
    whole = make_plan(s, "cpu", ram_memory="16GiB", ctx=4096, cache_dtype_bytes=4)
    assert whole.experts_on == "device" and whole.cache_bytes == s.expert_file_total
    assert whole.ram_expert_bytes == 0 and whole.ram_budgeted == latent + s.expert_file_total
    # gpu_memory on CPU caps the device tier: a RAM tier behind a few slots
    capped = make_plan(s, "cpu", gpu_memory="2GiB", ram_memory="16GiB", ctx=4096, cache_dtype_bytes=4)
    assert capped.experts_on == "ram" and capped.device_total <= 2 * GiB
    assert capped.ram_budgeted <= 16 * GiB and 1 <= capped.slots_per_layer <= 12


def test_expert_cache_option_and_sizes():
    s = model_sizes(*synthetic(**LITE))
    plan = make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=4096, expert_cache=12)
    assert plan.slots_per_layer == 12 and plan.experts_on == "ram"
    by_bytes = make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=4096, expert_cache=26 * LITE_EXPERT * 7)
    assert by_bytes.slots_per_layer == 7
    with pytest.raises(LiteError, match="slots"):
        make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=4096, expert_cache=64 * 2)
    assert parse_size("6GiB") == 6 * GiB and parse_size("1.5GiB") == 3 * GiB // 2 and parse_size(1000) == 1000
    assert parse_size("500MB") == 500_000_000
    with pytest.raises(LiteError, match="6GiB"):
        parse_size("lots")


def test_lite_plan_command(tmp_path, hf_lite, capsys):
    import json

    from cli.main import main
    from lite.convert import convert

    path = tmp_path / "tiny.gguf"
    convert(hf_lite, path)
    assert main(["plan", str(path), "--device", "cpu", "--gpu-mem", "64MiB", "--ram", "1GiB", "--ctx", "256"]) == 0
    out = capsys.readouterr().out
    assert "latent cache (256 tokens)" in out and "experts on device" in out and "token embedding" in out
    assert main(["plan", str(path), "--device", "cpu", "--gpu-mem", "64MiB", "-c", "256", "--json",
                 "--expert-cache", "2"]) == 0  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    # tiny "lite" config: 3 layers, kv_lora 64 + rope 16 values per token and layer
    # a quantized file's cache is bf16 on a CPU with bf16 instructions (as lite.load makes it), else float32
    value_bytes = 2 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 4
    assert plan["device_bytes"]["latent_cache"] == 3 * (64 + 16) * value_bytes * 256 and plan["slots_per_layer"] == 2
    assert plan["experts_on"] == "ram" and plan["moe_layers"] == [1, 2] and plan["ctx"] == 256
    assert main(["plan", str(path), "--device", "cpu", "--gpu-mem", "1MiB"]) == 2  # refused, one line
    err = capsys.readouterr().err
    assert "--gpu-mem" in err and err.count("\n") == 1


def test_cpu_dense_bytes_follow_the_cpu_kernels():
    """On CPU 2-D weights cost what `loaded_nbytes(..., "cpu", 4)` says; experts are their GGUF bytes everywhere."""
    from quant.qmatrix import loaded_nbytes

    meta, tensors = synthetic(**LITE)
    s = model_sizes(meta, tensors, dtype_bytes=4, device="cpu")
    assert s.expert_bytes == s.expert_file_bytes == LITE_EXPERT
    two_d = sum(
        loaded_nbytes(t.qtype, t.shape, "cpu", 4)
        for n, t in tensors.items()
        if len(t.shape) == 2 and "_exps" not in n and "ffn_gate_inp" not in n and n != "token_embd.weight"
    )
    assert s.dense_bytes > two_d  # plus norms, routers and attn_k_b/attn_v_b in float32
