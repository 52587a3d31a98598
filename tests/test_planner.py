"""The planner's numbers for the real DeepSeek-V2-Lite and DeepSeek-V2 shapes, from synthetic metadata."""

from __future__ import annotations

from typing import NamedTuple

import gguf
import pytest

from lite.errors import LiteError
from offload.planner import GiB, make_plan, model_sizes, parse_size

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


def test_lite_sizes_and_latent_cache():
    s = model_sizes(*synthetic(**LITE))
    assert s.moe_layers == list(range(1, 27)) and s.n_experts == 64 and s.experts_per_token == 6
    # one Q4_K expert in the file: 3 matrices of 1408 rows x 2048/256 blocks x 144 bytes = 4.87 MB (the issue's
    # ~4.9 MB); loaded as int4pack: 4 bits per weight + a bf16 (scale, zero) per 32 weights = 5 bits per weight
    assert s.expert_file_bytes == 3 * 1408 * 8 * 144 == 4_866_048
    assert s.expert_bytes == 3 * (1408 * 2048 // 2 + 2048 // 32 * 1408 * 4) == 5_406_720
    assert s.expert_total == 26 * 64 * 5_406_720
    # the example: 27 x 576 x 2 x 131072 bytes = 3.80 GiB
    assert s.latent_bytes(131072, 2) == 27 * 576 * 2 * 131072
    assert round(s.latent_bytes(131072, 2) / GiB, 2) == 3.80
    plan = make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=131072)
    assert plan.latent_bytes == 27 * 576 * 2 * 131072


def test_lite_on_8gb_gpu():
    s = model_sizes(*synthetic(**LITE))
    plan = make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=4096)
    reserve = min(GiB, s.dense_bytes // 8)
    free = 8 * GiB - s.dense_bytes - 27 * 576 * 2 * 4096 - reserve
    assert plan.slots_per_layer == free // (26 * 5_406_720) < 64
    assert plan.experts_on == "ram" and plan.ram_expert_bytes == s.expert_total
    assert plan.device_total <= 8 * GiB
    # everything fits a bigger card: experts_on auto becomes "device"
    assert make_plan(s, "cuda", gpu_memory="24GiB", ram_memory="32GiB", ctx=4096).experts_on == "device"


def test_v2_on_24gb_gpu_ram_or_disk():
    s = model_sizes(*synthetic(**V2))
    assert s.expert_file_bytes == 3 * 1536 * 20 * 144
    assert s.expert_bytes == 3 * (1536 * 5120 // 2 + 5120 // 32 * 1536 * 4)
    assert len(s.moe_layers) == 59 and s.expert_total == 59 * 160 * s.expert_bytes
    assert s.latent_bytes(4096, 2) == 60 * 576 * 2 * 4096
    in_ram = make_plan(s, "cuda", gpu_memory="24GiB", ram_memory="192GiB", ctx=4096)
    assert in_ram.experts_on == "ram" and 6 <= in_ram.slots_per_layer < 160
    on_disk = make_plan(s, "cuda", gpu_memory="24GiB", ram_memory="64GiB", ctx=4096)
    assert on_disk.experts_on == "disk"
    assert on_disk.ram_expert_bytes == 64 * GiB // s.expert_bytes * s.expert_bytes
    with pytest.raises(LiteError, match="experts_on=disk"):
        make_plan(s, "cuda", gpu_memory="24GiB", ram_memory="64GiB", ctx=4096, experts_on="ram")


def test_refusals_say_what_would_fit():
    s = model_sizes(*synthetic(**LITE))
    with pytest.raises(LiteError, match=r"--ctx \d+") as e:  # the dense part fits, the long context does not
        make_plan(s, "cuda", gpu_memory="4GiB", ram_memory="32GiB", ctx=131072)
    ctx = int(str(e.value).split("--ctx ")[1].split(")")[0])
    make_plan(s, "cuda", gpu_memory="4GiB", ram_memory="32GiB", ctx=ctx)  # the suggestion works
    with pytest.raises(LiteError):
        make_plan(s, "cuda", gpu_memory="4GiB", ram_memory="32GiB", ctx=ctx + 1)
    with pytest.raises(LiteError, match="--gpu-mem"):
        make_plan(s, "cuda", gpu_memory="1GiB", ram_memory="32GiB", ctx=4096)
    with pytest.raises(LiteError, match="experts_on=device"):
        make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=4096, experts_on="device")
    with pytest.raises(LiteError, match="--ram"):
        make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="40MiB", ctx=4096, experts_on="disk")


def test_expert_cache_option_and_sizes():
    s = model_sizes(*synthetic(**LITE))
    plan = make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=4096, expert_cache=12)
    assert plan.slots_per_layer == 12 and plan.experts_on == "ram"
    by_bytes = make_plan(s, "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=4096, expert_cache=26 * 5_406_720 * 7)
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
    assert "latent cache (256 tokens)" in out and "experts on device" in out
    assert main(["plan", str(path), "--device", "cpu", "--gpu-mem", "64MiB", "--ctx", "256", "--json",
                 "--expert-cache", "2"]) == 0  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    # tiny "lite" config: 3 layers, kv_lora 64 + rope 16 values per token and layer, float32 on CPU
    assert plan["latent_bytes"] == 3 * (64 + 16) * 4 * 256 and plan["slots_per_layer"] == 2
    assert plan["experts_on"] == "ram" and plan["moe_layers"] == [1, 2]
    assert main(["plan", str(path), "--device", "cpu", "--gpu-mem", "1MiB"]) == 2  # refused, one line
    assert "--gpu-mem" in capsys.readouterr().err


def test_cpu_plan_counts_gguf_bytes_where_native_kernels_run():
    """On CPU the native kernels multiply the GGUF blocks as they are: a loaded expert costs its file bytes."""
    from quant import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.build_error()}")
    s = model_sizes(*synthetic(**LITE), dtype_bytes=4, device="cpu")
    assert s.expert_bytes == s.expert_file_bytes == 4_866_048
