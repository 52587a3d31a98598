"""`lite run`, `lite bench`, `lite perplexity` and the flags' documentation, through subprocesses on tiny
converted models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_models import tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("chat", "run", "serve", "bench", "perplexity")


def lite_subprocess(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter (slow: a torch import each)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args], input=stdin, capture_output=True, text=True, env=env,
        cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_chat_model(tmp_path_factory.mktemp("cli_models"))


def test_run_greedy_matches_transformers(tiny):
    from hf_helpers import tokenizer_from_hf
    from transformers import DeepseekV2ForCausalLM

    model, hf = tiny
    rec = json.loads(lite_subprocess("run", str(model), "--json", "-p", "The experts", "--temp", "0", "-n", "6").stdout)
    tok = tokenizer_from_hf(hf)
    ids = tok.encode("The experts", add_bos=True)
    assert rec["prompt_tokens"] == len(ids)
    ref = DeepseekV2ForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    expected = []
    for _ in range(6):  # greedy with transformers' full forward as the reference
        with torch.no_grad():
            nxt = int(torch.argmax(ref(torch.tensor([ids + expected])).logits[0, -1]))
        if nxt == tok.eos_id:
            break
        expected.append(nxt)
    assert rec["tokens"] == expected
    assert rec["text"] == tok.decode(expected)
    assert rec["finish"] == ("length" if len(expected) == 6 else "stop")


def test_run_seeded_sampling_is_reproducible_and_streams(tiny, lite):
    model, _ = tiny

    def run_json(*args: str, stdin: str | None = None) -> dict:
        return json.loads(lite("run", str(model), "--json", *args, stdin=stdin).stdout)

    args = ("-p", "Once", "-n", "12", "--temp", "1.0", "--top-k", "0", "--top-p", "1", "--min-p", "0")
    a = run_json(*args, "--seed", "11")
    b = run_json(*args, "--seed", "11")
    c = run_json(*args, "--seed", "12")
    assert a["tokens"] == b["tokens"] and a["seed"] == 11
    assert a["tokens"] != c["tokens"]
    assert run_json(*args[2:], "--seed", "11", stdin="Once")["tokens"] == a["tokens"]  # prompt from stdin
    # the real entry point streams the same text (a fresh process: same seed, same output)
    streamed = lite_subprocess("run", str(model), *args[2:], "--seed", "11", "-t", "1", stdin="Once").stdout
    assert streamed == a["text"] + "\n"


def test_run_chat_template_and_system(tiny, lite):
    from hf_helpers import tokenizer_from_hf

    model, hf = tiny
    rec = json.loads(
        lite(
            "run", str(model), "--json", "--chat", "--system", "Be short.", "-p", "Hello", "-n", "3", "--temp", "0"
        ).stdout
    )
    msgs = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hello"}]
    assert rec["prompt_tokens"] == len(tokenizer_from_hf(hf).apply_chat_template(msgs))
    for key in ("generated_tokens", "prompt_seconds", "generation_seconds", "ttft_seconds"):
        assert rec[key] >= 0


def test_user_errors_are_one_line(tiny, tmp_path, lite):
    model, _ = tiny
    for args in (
        ("run", str(tmp_path / "missing.gguf"), "-p", "x"),
        ("run", str(model), "-p", "x", "--top-p", "2"),
        ("run", str(model), "-p", "x", "--system", "s"),
        ("run", str(model), "-p", "x", "--prefetch", "sometimes"),
        ("run", str(model), "-p", "x", "--expert-cache", "lots"),
        ("run", str(model), "-p", "x", "--miss-policy", "never"),
        ("perplexity", str(model), str(tmp_path / "missing.txt")),
        ("bench", str(model), "-p", "400", "-n", "200"),  # beyond the model's 512 positions
    ):
        proc = lite(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_offload_flags_reach_the_engine_and_keep_the_output(tiny, lite):
    model, _ = tiny
    base = ("run", str(model), "--json", "-p", "Once upon", "-n", "6", "--temp", "0")
    ref = json.loads(lite(*base).stdout)
    flags = ("--experts-on", "ram", "--expert-cache", "1", "--miss-policy", "fetch", "--prefetch", "2")
    rec = json.loads(lite(*base, *flags).stdout)
    assert rec["tokens"] == ref["tokens"]
    assert 0 <= rec["expert_cache_hit_rate"] < 1  # one slot per layer for top-k routing: some misses


def test_default_model(tiny, lite):
    from cli.common import DEFAULT_MODEL

    proc = lite("run", "-p", "Hi", "-n", "2", "--temp", "0", check=False)
    if DEFAULT_MODEL.is_file():
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 2 and "lite convert" in proc.stderr and proc.stderr.count("\n") == 1


def test_bench_json_table_and_trace(tiny, tmp_path, lite):
    model, _ = tiny
    trace = tmp_path / "trace.jsonl"
    rec = json.loads(
        lite("bench", str(model), "-p", "16", "-n", "5", "-r", "2", "--json", "--trace", str(trace)).stdout
    )
    assert rec["n_prompt"] == 16 and rec["n_gen"] == 5 and len(rec["runs"]) == 2
    for key in ("pp_tps", "tg_tps", "ttft_s"):
        s = rec[key]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert "meta" in lines[0]
    calls = lines[1:]
    # 2 runs x (1 prefill + 4 decode steps) forward passes, each through the 2 MoE layers of the tiny model
    assert len(calls) == 2 * 5 * 2
    assert [len(c["selected"]) for c in calls[:2]] == [16, 16] and len(calls[2]["selected"]) == 1
    table = lite("bench", str(model), "-p", "8", "-n", "3", "-r", "2").stdout
    assert "pp8" in table and "tg3" in table and "TTFT" in table


def test_perplexity_cli_matches_library(tiny, tmp_path, lite):
    from tiny_tokenizer import TRAINING_TEXT

    import lite as lite_lib
    from lite.perplexity import perplexity

    model, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text(TRAINING_TEXT * 2, encoding="utf-8")
    rec = json.loads(lite("perplexity", str(model), str(text), "--ctx", "64", "--chunks", "3", "--json").stdout)
    m = lite_lib.load(str(model), device="cpu")
    ref = perplexity(m, m.tokenizer.encode(text.read_text(), add_bos=True), 64, 3, bos_id=m.tokenizer.bos_id)
    assert rec["chunks"] == 3 and rec["tokens_scored"] == 3 * 31
    assert rec["ppl"] == pytest.approx(ref.ppl, rel=1e-6)
    out = lite("perplexity", str(model), str(text), "--ctx", "64", "--chunks", "2").stdout
    assert f"perplexity: {rec['chunk_ppl'][1]:.4f}" in out


def test_sampling_defaults_come_from_the_model():
    import argparse

    from cli import common
    from lite.sampling import SamplingParams

    p = argparse.ArgumentParser()
    common.add_sampling_args(p)
    md = {"general.sampling.temp": 0.3, "general.sampling.top_k": 20, "general.sampling.penalty_last_n": 32}
    params = common.sampling_params(p.parse_args([]), md)
    assert (params.temperature, params.top_k, params.repeat_last_n) == (0.3, 20, 32)
    assert params.top_p == SamplingParams().top_p  # not in the file: lite's default
    params = common.sampling_params(p.parse_args(["--temp", "0", "--top-k", "5", "--seed", "9"]), md)
    assert (params.temperature, params.top_k, params.seed) == (0.0, 5, 9)  # flags win


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_in_help_and_readme(command):
    from cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    help_text = sub.format_help()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(f"### `lite {command}") :]
    section = section[: section.find("\n### ", 4) if "\n### " in section[4:] else len(section)]
    for action in sub._actions:
        for flag in action.option_strings:
            if flag in ("-h", "--help", "--debug"):  # every command's; README says so once
                continue
            assert flag in help_text, (command, flag)
            assert flag in section, f"README's `lite {command}` section lacks {flag}"


def test_global_flags_are_documented():
    readme = (ROOT / "README.md").read_text()
    assert "`--debug`" in readme and "`lite --version`" in readme
