"""One context and budget story (cli/budget.py): the context defaults to min(4096, the model's) before any
budget is checked, beyond the model's is an error everywhere, sizes are bytes or K/M/G/T[i]B, messages name
the flags. In-process on the bundled demo model (512-token context, 3 MoE layers x 16 experts of 108 KiB)."""

from __future__ import annotations

import json
import re

import pytest

from cli.budget import flag_names, parse_size, resolve_ctx
from cli.common import DEFAULT_MODEL
from lite.errors import LiteError

DEMO = str(DEFAULT_MODEL)
needs_demo = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="the bundled demo model is not built")


@pytest.mark.parametrize(
    "text, n",
    [
        ("1048576", 1048576), ("1048576B", 1048576), ("1KiB", 1024), ("1KB", 1000), ("1.5GiB", 1610612736),
        ("8gb", 8 * 10**9), (" 2 MiB ", 2 * 2**20), ("1TiB", 2**40), ("0", 0), (".5KiB", 512),
    ],
)  # fmt: skip
def test_sizes(text, n):
    assert parse_size(text, "--ram") == n


@pytest.mark.parametrize("text", ["6G", "-1", "1.5", "abc", "inf", "nan", "1e9", "5 GiBs", ""])
def test_bad_sizes_name_the_flag(text):
    with pytest.raises(LiteError) as e:
        parse_size(text, "--gpu-mem")
    assert str(e.value).startswith("--gpu-mem ")


def test_flag_names():
    assert flag_names("use experts_on=disk or --ram 5 MiB; expert_cache of 3 slots; gpu_memory") == (
        "use --experts-on disk or --ram 5 MiB; --expert-cache of 3 slots; --gpu-mem"
    )
    assert (
        flag_names("use a context of at most 993 tokens (ctx=993), or")
        == "use a context of at most 993 tokens (-c 993), or"
    )
    assert flag_names("(ctx=993)", "--ctx") == "(--ctx 993)"


def test_resolve_ctx():
    assert resolve_ctx(None, 512, "-c") == 512 and resolve_ctx(None, 163840, "-c") == 4096
    assert resolve_ctx(None, 163840, "--ctx", default=512) == 512 and resolve_ctx(300, 512, "-c") == 300
    with pytest.raises(LiteError, match="^-c 513 exceeds the model's context of 512 tokens; use 512 or less$"):
        resolve_ctx(513, 512, "-c")
    with pytest.raises(LiteError, match="^-c 4 is too small; use at least 8 tokens$"):
        resolve_ctx(4, 512, "-c")


def error(r) -> str:
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    return r.stderr[len("error: ") : -1]


F32 = ("--cache-type", "f32")  # the figures below are for a float32 latent cache


@needs_demo
@pytest.mark.parametrize(
    "args, message",
    [
        (("plan", DEMO, "-c", "32768"), "-c/--ctx-size 32768 exceeds the model's context of 512 tokens; use 512 or "
         "less"),
        (("run", "-p", "x", "-c", "100000"), "-c/--ctx-size 100000 exceeds the model's context of 512 tokens; use "
         "512 or less"),
        (("chat", "-c", "100000"), "-c/--ctx-size 100000 exceeds the model's context of 512 tokens; use 512 or less"),
        (("bench", "-c", "100000"), "-c/--ctx-size 100000 exceeds the model's context of 512 tokens; use 512 or less"),
        (("bench", "-p", "400", "-n", "200"), "-p 400 plus -n 200 need 600 tokens, more than the model's context of "
         "512; lower -p or -n"),
        (("perplexity", DEMO, "README.md", "--ctx", "1024"), "--ctx 1024 exceeds the model's context of 512 tokens; "
         "use 512 or less"),
        (("perplexity", DEMO, "README.md", "--chunks", "-1"), "--chunks must be at least 1, got -1; leave it out to "
         "score every chunk"),
        (("run", "-p", "x", "--ram", "1KiB", *F32), "the RAM budget 1.00 KiB cannot hold the latent cache for 512 "
         "tokens (1.25 MiB) + the least the experts need (756.00 KiB: one slot per layer and a disk-tier LRU of 4 "
         "experts); use a RAM budget of at least 1.99 MiB (--ram)"),
        (("run", "-p", "x", "--expert-cache", "17"), "--expert-cache 17 slots is out of range: this model has 16 "
         "experts per layer; give 1 to 16 slots, or a size such as 2GiB"),
        (("run", "-p", "x", "--expert-cache", "2KiB"), "--expert-cache 2KiB is less than one expert slot per layer "
         "(324.00 KiB); give slots per layer or a larger size"),
        (("run", "-p", "x", "--gpu-mem", "6G"), "--gpu-mem takes bytes or a size such as 6GiB, 512MiB or 8GB, "
         "got '6G'"),
        (("run", "-p", "x", "--experts-on", "device", "--gpu-mem", "7MiB", *F32), "--experts-on device needs 10.79 "
         "MiB in the device tier for the dense weights, the latent cache, the reserve and all experts but --gpu-mem "
         "caps it at 7.00 MiB; use --experts-on auto or --gpu-mem 10.79 MiB"),
        (("run", "-p", "x", "-c", "512", "--gpu-mem", "5MiB", *F32), "the device budget 5.00 MiB cannot hold the "
         "dense weights (3.98 MiB) + latent cache for 512 tokens (1.25 MiB) + reserve (509.12 KiB) + one expert "
         "slot per layer (324.00 KiB); use a device budget of at least 6.04 MiB (--gpu-mem)"),
        (("run", "-p", "x", "-c", "512", "--gpu-mem", "6MiB", *F32), "use a context of at most 495 tokens (-c 495), "
         "or a device budget of at least 6.04 MiB (--gpu-mem)"),
    ],
)  # fmt: skip
def test_context_and_budget_errors_name_the_flags(lite, args, message):
    got = error(lite(*args, check=False))
    assert got == message or (message.startswith("use a context") and got.endswith(message)), got


def plan(lite, *args: str) -> dict:
    return json.loads(lite("plan", DEMO, "--json", "--device", "cpu", *args).stdout)


@needs_demo
def test_plans_follow_the_flags(lite):
    p = plan(lite)
    assert p["ctx"] == 512 and p["experts_on"] == "device"  # min(4096, the model's 512), everything fits
    p = plan(lite, "--ram", "3145728")  # plain bytes, smaller than the latent cache + 5 MiB of experts: the disk tier
    assert (p["budgets"]["ram_memory"], p["experts_on"]) == (3145728, "disk")
    assert p["ram_bytes"]["budgeted"] <= 3145728
    assert plan(lite, "--ram", "1GiB")["experts_on"] == "device"
    assert plan(lite, "--expert-cache", "2")["slots_per_layer"] == 2  # digits are slots
    assert plan(lite, "--expert-cache", "1MiB")["slots_per_layer"] == 3  # a size is bytes: 1 MiB // (3 x 108 KiB)
    assert plan(lite, "-c", "100")["ctx"] == 100
    assert plan(lite, "--ctx-size", "100")["ctx"] == plan(lite, "--ctx", "100")["ctx"] == 100  # as run/chat spell it


def test_miss_policy_is_checked_in_one_place():
    import argparse

    from cli.budget import offload_options
    from offload.policy import check_miss_policy

    with pytest.raises(LiteError) as lib:
        check_miss_policy("never")
    assert str(lib.value) == "miss_policy must be auto, fetch or cpu (got 'never')"
    args = argparse.Namespace(gpu_mem=None, ram=None, expert_cache=None, miss_policy="never")
    with pytest.raises(LiteError) as cli:
        offload_options(args, sizes=None)
    assert str(cli.value) == "--miss-policy must be auto, fetch or cpu (got 'never')"  # the same check, the flag


def test_sampling_metadata_errors_name_the_overriding_flag():
    import argparse

    from cli import common

    p = argparse.ArgumentParser()
    common.add_sampling_args(p)
    with pytest.raises(LiteError) as e:
        common.sampling_params(p.parse_args([]), {"general.sampling.top_p": 3.0})
    assert str(e.value) == "the model's general.sampling.top_p must be a number from 0 to 1 (1 = off), got 3.0; " \
        "override it with --top-p"  # fmt: skip
    assert common.sampling_params(p.parse_args(["--top-p", "0.5"]), {"general.sampling.top_p": 3.0}).top_p == 0.5


@needs_demo
def test_header_summary_is_lite_info():
    from pathlib import Path

    from cli.common import human_bytes, model_summary
    from lite.info import describe

    d, s = describe(DEMO), model_summary(Path(DEMO))
    assert (s["bpw"], s["expert_bpw"], s["size"]) == (
        d["bits_per_weight"],
        d["expert_bits_per_weight"],
        d["file_bytes"],
    )
    assert s["expert_quant"] == "+".join(d["expert_types"]) and s["family"] == d["family"]
    assert human_bytes(3 << 30) == "3.0 GiB" and human_bytes(1536) == "1.5 KiB" and human_bytes(12) == "12 B"


@needs_demo
def test_the_default_context_is_settled_before_the_budget(lite):
    """The issue's case: 8 MiB was refused for a 4096-token cache although the model holds 512 tokens."""
    rec = json.loads(lite("run", "-p", "hi", "-n", "2", "--gpu-mem", "8MiB", "--json").stdout)
    assert rec["generated_tokens"] == 2
    rec = json.loads(lite("run", "-p", "hi", "-n", "2", "--ram", "3145728", "--json").stdout)  # disk tier, runs
    assert rec["generated_tokens"] == 2


@needs_demo
def test_bench_with_no_arguments_fits_the_model(lite):
    rec = json.loads(lite("bench", "-r", "1", "--json").stdout)
    assert (rec["n_prompt"], rec["n_gen"], rec["ctx"]) == (384, 128, 512)
    rec = json.loads(lite("bench", "-r", "1", "-c", "64", "--json").stdout)
    assert (rec["n_prompt"], rec["n_gen"], rec["ctx"]) == (48, 16, 64)


@needs_demo
def test_bench_table_says_n_a_as_stats_does(lite):
    out = lite("bench", "-r", "1", "-p", "8", "-n", "4").stdout
    assert re.search(r"prefetch_precision\s+│\s+n/a", out) and "None" not in out
