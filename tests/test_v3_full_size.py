"""A sparse full-size DeepSeek-V3 Q4_K_M file (671B: 61 layers, 256 experts top-8; tests/full_size_gguf.py):
`lite plan` gives a plan or a one-line refusal with numbers for any budget, and `lite info` names the family."""

from __future__ import annotations

import json
import os

import pytest
from full_size_gguf import V3_CONFIG, write_full_size_gguf
from test_config import V2_HUB, V2_LITE_HUB
from test_v3_convert import KIMI_K2_HUB, MOONLIGHT_HUB

from cli.main import main
from lite.config import ARCH
from lite.convert.hf_meta import gguf_metadata_from_hf
from lite.info import family
from offload.planner import GiB, plan_file


@pytest.fixture(scope="module")
def v3_file(tmp_path_factory) -> str:
    path = str(write_full_size_gguf(tmp_path_factory.mktemp("full_v3") / "DeepSeek-V3-Q4_K_M.gguf", "v3"))
    yield path
    os.remove(path)


def test_sparse_v3_file(v3_file):
    st = os.stat(v3_file)
    assert abs(st.st_size - 404.4e9) < 0.01 * 404.4e9  # the community DeepSeek-V3 Q4_K_M files: 404 GB
    assert st.st_blocks * 512 < 1 << 20


def test_plan_targets(v3_file, capsys):
    """24 GiB card: experts in 512 GiB of RAM, or on disk behind a 128 GiB LRU; each with a device cache."""
    _, sizes = plan_file(v3_file, "cuda", gpu_memory="24GiB", ram_memory="512GiB", ctx=8192)
    assert sizes.moe_layers == list(range(3, 61)) and sizes.n_experts == 256 and sizes.experts_per_token == 8
    for ram, tier in (("512GiB", "ram"), ("128GiB", "disk")):
        argv = [v3_file, "--device", "cuda", "--gpu-mem", "24GiB", "--ram", ram, "-c", "8192", "--json"]
        assert main(["plan", *argv]) == 0
        p = json.loads(capsys.readouterr().out)
        assert p["experts_on"] == tier and p["slots_per_layer"] >= 8
        assert p["device_bytes"]["total"] <= 24 * GiB and p["ram_bytes"]["budgeted"] <= int(ram[:-3]) * GiB
        assert p["ram_bytes"]["dense"] + p["device_bytes"]["dense"] > 10 * GiB  # 671B: ~15B dense parameters


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "cuda", "--gpu-mem", "24GiB", "--ram", "512GiB"],
        ["--device", "cuda", "--gpu-mem", "8GiB", "--ram", "512GiB", "-c", "131072"],
        ["--device", "cuda", "--gpu-mem", "80GiB", "--ram", "64GiB"],
        ["--device", "cpu", "--ram", "64GiB", "-c", "4096"],
        ["--device", "cpu", "--ram", "16GiB"],
        ["--device", "cpu", "--ram", "1GiB", "-c", "512"],
    ],
    ids=["24G-512G", "8G-128K", "80G-64G", "cpu-64G", "cpu-16G", "cpu-1G"],
)
def test_plan_or_refusal_with_numbers(v3_file, capsys, argv):
    """Never a traceback: a plan (exit 0), or one `error:` line with the sizes and the fix (exit 2)."""
    rc = main(["plan", v3_file, *argv])
    out = capsys.readouterr()
    if rc == 0:
        assert "experts on" in out.out and "256" in out.out
    else:
        assert rc == 2 and out.err.startswith("error: ") and out.err.count("\n") == 1
        assert "GiB" in out.err and ("--ctx" in out.err or "--ram" in out.err or "--gpu-mem" in out.err)


def test_info_names_the_family(v3_file, capsys):
    assert main(["info", v3_file]) == 0
    out = capsys.readouterr().out
    assert "family DeepSeek-V3/R1" in out
    assert "router sigmoid + correction bias, top-8 of 256 in 4 of 8 groups (top-2 sum), normalised, x2.5" in out


@pytest.mark.parametrize(
    "cfg, name",
    [
        (V2_HUB, "DeepSeek-V2"),
        (V2_LITE_HUB, "DeepSeek-V2-Lite"),
        (V3_CONFIG, "DeepSeek-V3/R1"),
        (MOONLIGHT_HUB, "Moonlight"),
        (KIMI_K2_HUB, "Kimi-K2"),
        (dict(V3_CONFIG, num_hidden_layers=4), "deepseek2 variant (sigmoid router)"),
        (dict(V2_HUB, n_routed_experts=8), "deepseek2 variant (softmax router)"),
    ],
)
def test_family_names(cfg, name):
    meta = {"general.architecture": ARCH, **gguf_metadata_from_hf(cfg)}
    assert family(meta) == name
    unknown = {**meta, f"{ARCH}.expert_gating_func": 7}
    assert family(unknown) == f"deepseek2 variant (unknown router: {ARCH}.expert_gating_func = 7)"


def test_chat_header_names_the_family(v3_file):
    from pathlib import Path

    from cli.common import header_line

    class Resident:  # what the header asks of a loaded model
        device = "cuda"

        def stats(self) -> dict:
            return {"tier": "ram", "slots_per_layer": 8, "n_experts": 256, "prefetch_lookahead": 1}

    line = header_line(Path(v3_file), Resident(), 8192)
    assert line.startswith("DeepSeek-V3 · DeepSeek-V3/R1 · experts Q4_K+")
    assert "8/256 expert slots/layer on cuda" in line
