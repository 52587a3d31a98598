"""`lite convert` and `lite info` as a user runs them: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lite(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "cli.main", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], r.stderr


@pytest.fixture(scope="module")
def converted(hf_lite, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cli") / "tiny model.gguf"  # a space: the printed next command must quote it
    return out, lite("convert", hf_lite, "-o", out)


def test_convert_prints_summary_and_next_command(converted):
    out, r = converted
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    assert "routed experts 4.50 bits/weight" in r.stdout and "bits/weight overall" in r.stdout
    assert "blk.1.ffn_down_exps.weight: Q4_K → Q4_0" in r.stdout  # the fallback is reported
    assert "input 7.6 MB → output" in r.stdout and "tokenizer: none" in r.stdout
    *_, next_line, last = r.stdout.strip().splitlines()
    assert next_line == f"next: lite chat '{out}'"
    assert re.fullmatch(r"done in \d+\.\d s: \d+\.\d MB, \d\.\d\d bits/weight, peak RSS \d+\.\d\d GiB", last), last


def test_refuses_overwrite_then_dry_run(converted, hf_lite):
    out, _ = converted
    before = out.stat().st_mtime_ns
    assert_one_line_error(lite("convert", hf_lite, "-o", out), "already exists; pass --force")
    r = lite("convert", hf_lite, "-o", out.with_name("plan.gguf"), "--dry-run", "--experts", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "estimated output" in r.stdout and "expert   Q8_0" in r.stdout
    assert not out.with_name("plan.gguf").exists() and out.stat().st_mtime_ns == before


def test_convert_errors_are_one_line(tmp_path):
    assert_one_line_error(lite("convert", tmp_path, "-o", tmp_path / "m.gguf"), "has no config.json")
    assert not (tmp_path / "m.gguf").exists()
    r = lite("convert", tmp_path, "-o", tmp_path / "m.gguf", "--experts", "q2_k")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_info(converted, tmp_path):
    out, _ = converted
    r = lite("info", out, "--tensors")
    assert r.returncode == 0, r.stderr
    for text in ("architecture deepseek2", "deepseek2.expert_count", "Q4_K", "Q8_0", "F32", "blk.2.ffn_up_exps.weight"):
        assert text in r.stdout, text
    assert "44 tensors" in r.stdout and "(routed experts 4.50)" in r.stdout
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert_one_line_error(lite("info", bad), "not a readable GGUF file")


def test_info_describe_abbreviates(converted):
    from lite.info import abbreviate, describe

    out, _ = converted
    d = describe(out)
    assert d["n_tensors"] == 44 and d["architecture"] == "deepseek2"
    assert d["expert_bits_per_weight"] == pytest.approx(4.5)
    assert set(d["types"]) == {"Q4_K", "Q4_0", "Q8_0", "F32"}
    assert sum(t["count"] for t in d["types"].values()) == 44
    assert abbreviate(list(range(1000))).startswith("[1000 items] 0, 1, 2")
