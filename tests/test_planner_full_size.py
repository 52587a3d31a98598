"""`lite plan` on sparse full-size Q4_K_M files of DeepSeek-V2 (236B) and V2-Lite (tests/full_size_gguf.py): the
issue's targets, the JSON schema, planning for CUDA on a machine without one, and RAM bounds on the CPU."""

from __future__ import annotations

import json
import os

import gguf
import pytest
from full_size_gguf import use_more_bits, write_full_size_gguf

from cli.main import main
from offload.planner import GiB, plan_file, tensor_bytes
from quant.gguf_file import GGUFFile

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("full_size")
    out = {m: str(write_full_size_gguf(d / f"{m}-Q4_K_M.gguf", m)) for m in ("v2", "lite")}
    yield out
    for path in out.values():
        os.remove(path)


def plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sparse_files_are_full_size_and_cost_no_disk(files):
    for model, size in (("v2", 142.6e9), ("lite", 10.37e9)):
        st = os.stat(files[model])
        assert abs(st.st_size - size) < 0.01 * size  # the community Q4_K_M files: 142.5 GB and 10.4 GB
        assert st.st_blocks * 512 < 1 << 20


def test_per_layer_expert_bytes(files):
    """Q4_K_M gives ffn_down_exps Q6_K (V2) / Q8_0 (Lite, rows of 1408) on the "more bits" layers, Q4_K / Q5_0 on the
    others: one expert's bytes differ per layer and the cache sums them."""
    for model, n_layers, (more, fewer) in (("v2", 60, (Q.Q6_K, Q.Q4_K)), ("lite", 27, (Q.Q8_0, Q.Q5_0))):
        plan, sizes = plan_file(files[model], "cuda", gpu_memory="24GiB", ram_memory="256GiB", ctx=4096)
        tensors = GGUFFile(files[model]).tensors
        for layer in sizes.moe_layers:
            down = tensors[f"blk.{layer}.ffn_down_exps.weight"]
            assert down.qtype == (more if use_more_bits(layer, n_layers) else fewer)
            stacks = [tensors[f"blk.{layer}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")]
            assert sizes.expert_file_bytes_by_layer[layer] == sum(t.nbytes for t in stacks) // sizes.n_experts
        assert len(set(sizes.expert_file_bytes_by_layer.values())) == 2
        all_experts = sum(t.nbytes for name, t in tensors.items() if "_exps." in name)
        assert sizes.expert_file_total == all_experts == sizes.file_set_bytes * sizes.n_experts
        assert sizes.expert_file_bytes == max(sizes.expert_file_bytes_by_layer.values())
        assert sizes.expert_bytes == max(sizes.expert_bytes_by_layer.values())
        # the cache is slots x the sum over layers of that layer's expert bytes
        assert plan.cache_bytes == plan.slots_per_layer * sum(sizes.expert_bytes_by_layer.values())


def test_slot_layout_matches_the_engine(files):
    """A slot is the engine's pool row: `ExpertSpec.packed(...).nbytes`, 16-byte aligned."""
    try:
        from offload.experts import spec_of
    except ImportError as e:  # the engine side is not there yet
        pytest.skip(f"offload.experts.spec_of unavailable: {e}")
    from offload import ExpertStacks

    f = GGUFFile(files["lite"])
    _, sizes = plan_file(files["lite"], "cuda", gpu_memory="8GiB", ram_memory="64GiB", ctx=4096)
    for layer in sizes.moe_layers:
        st = ExpertStacks(*(f.tensors[f"blk.{layer}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")))
        assert sizes.expert_bytes_by_layer[layer] == -(-spec_of(st).nbytes // 16) * 16


def test_v2_targets(files, capsys):
    # 24 GiB card, 128 GiB of RAM, 128K context: experts in RAM, at least 6 slots per layer
    long = plan_json(capsys, files["v2"], "--device", "cuda", "--gpu-mem", "24GiB", "--ram", "128GiB", "-c", "131072")
    assert long["experts_on"] == "ram" and long["slots_per_layer"] >= 6
    assert long["device_bytes"]["total"] <= 24 * GiB and long["ram_bytes"]["budgeted"] <= 128 * GiB
    # 8K context: at least 12 slots per layer
    short = plan_json(
        capsys, files["v2"], "--device", "cuda", "--gpu-mem", "24GiB", "--ram", "128GiB", "--ctx-size", "8192"
    )
    assert short["experts_on"] == "ram" and short["slots_per_layer"] >= 12
    plan, _ = plan_file(files["v2"], "cuda", gpu_memory="24GiB", ram_memory="128GiB", ctx=131072)
    assert (plan.experts_on, plan.slots_per_layer) == (long["experts_on"], long["slots_per_layer"])
    for p in (long, short):  # device bytes per expert within 2% of the file's
        assert abs(p["bytes_per_expert_device"] - p["bytes_per_expert_file"]) <= 0.02 * p["bytes_per_expert_file"]
        assert p["bytes_per_expert_ram"] == p["bytes_per_expert_file"]  # the RAM tier is the file's mmap


def test_lite_target(files, capsys):
    p = plan_json(capsys, files["lite"], "--device", "cuda", "--gpu-mem", "8GiB", "-c", "131072")
    assert p["slots_per_layer"] >= 12 and p["device_bytes"]["total"] <= 8 * GiB
    assert abs(p["bytes_per_expert_device"] - p["bytes_per_expert_file"]) <= 0.02 * p["bytes_per_expert_file"]
    plan, _ = plan_file(files["lite"], "cuda", gpu_memory="8GiB", ram_memory="32GiB", ctx=131072)
    assert plan.experts_on == "ram" and plan.slots_per_layer == p["slots_per_layer"]


def test_json_schema(files, capsys):
    p = plan_json(capsys, files["lite"], "--device", "cuda", "--gpu-mem", "8GiB", "--ram", "32GiB", "-c", "8192")
    for key in ("device", "experts_on", "slots_per_layer", "bytes_per_expert_file", "bytes_per_expert_ram",
                "bytes_per_expert_device", "device_bytes", "ram_bytes"):  # fmt: skip
        assert key in p
    assert p["device"] == "cuda" and p["experts_on"] in ("device", "ram", "disk")
    assert set(p["device_bytes"]) >= {"dense", "latent_cache", "reserve", "expert_cache", "total"}
    assert set(p["ram_bytes"]) >= {"experts", "total"}
    d = p["device_bytes"]
    assert d["total"] == d["dense"] + d["latent_cache"] + d["reserve"] + d["expert_cache"]
    assert d["latent_cache"] == 27 * 576 * 2 * 8192
    by_layer = p["bytes_per_expert_by_layer"]
    assert sorted(map(int, by_layer)) == p["moe_layers"] == list(range(1, 27))
    assert p["bytes_per_expert_device"] == max(v["device"] for v in by_layer.values())
    assert d["expert_cache"] == p["slots_per_layer"] * sum(v["device"] for v in by_layer.values())
    r = p["ram_bytes"]
    assert r["experts"] == 64 * sum(v["file"] for v in by_layer.values())
    assert r["total"] == sum(v for k, v in r.items() if k not in ("total", "budgeted", "budget"))


def test_embedding_lives_in_ram(files, capsys):
    tensors = GGUFFile(files["v2"]).tensors
    embd = tensors["token_embd.weight"]
    p = plan_json(capsys, files["v2"], "--device", "cuda", "--gpu-mem", "24GiB", "--ram", "128GiB", "-c", "8192")
    dense = sum(tensor_bytes(n, t, 2, "cuda") for n, t in tensors.items() if "_exps." not in n and n != embd.name)
    assert p["device_bytes"]["dense"] == dense
    assert p["ram_bytes"]["embedding"] == embd.nbytes == 102400 * 5120 // 256 * 144


def test_cuda_without_a_gpu(files, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # budgets given: a plan, no GPU needed (RAM defaults to what psutil sees)
    p = plan_json(capsys, files["lite"], "--device", "cuda", "--gpu-mem", "8GiB", "-c", "131072")
    assert p["device"] == "cuda" and p["budgets"]["gpu_memory"] == 8 * GiB
    # no --gpu-mem: one line asking for it, exit 2
    assert main(["plan", files["lite"], "--device", "cuda", "--ram", "32GiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--gpu-mem" in err
    # the table renders without a GPU as well
    assert main(["plan", files["v2"], "--device", "cuda", "--gpu-mem", "24GiB", "--ram", "128GiB", "-c", "8192"]) == 0
    out = capsys.readouterr().out
    assert "token embedding" in out and "experts on ram" in out


def test_cpu_disk_tier_stays_inside_ram_memory(files, capsys):
    """The issue's finding: on CPU, experts_on=disk with ram_memory=2GiB reached 12 GB. Now the slots, the LRU and
    the latent cache share the 2 GiB; the dense weights, the embedding and the reserve come on top."""
    p = plan_json(capsys, files["lite"], "--device", "cpu", "--experts-on", "disk", "--ram", "2GiB", "-c", "4096")
    r = p["ram_bytes"]
    assert p["experts_on"] == "disk" and 1 <= p["slots_per_layer"] <= 12
    assert r["budgeted"] == r["latent_cache"] + r["expert_cache"] + r["experts"] <= 2 * GiB
    assert r["total"] == r["budgeted"] + r["dense"] + r["embedding"] + r["reserve"]
    assert r["total"] <= 2 * GiB + r["dense"] + r["embedding"] + GiB
    assert r["experts"] >= 2 * 6 * p["bytes_per_expert_ram"]  # an LRU of at least 2 x top-k experts
    # the default context (the model's 163840 tokens, float32) cannot fit 2 GiB: refused, saying what would
    assert main(["plan", files["lite"], "--device", "cpu", "--ram", "2GiB", "-c", "163840"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(-c " in err and "--ram" in err
