"""The `lite` command's one guard, and the bad inputs a new user tried: each ends in one `error: …` line and
exit 2 (a user error) or exit 1 with a pointer to --debug (a bug), never a traceback. Runs in-process on the
bundled demo model (512-token context, 16 experts per layer)."""

from __future__ import annotations

import json
import os

import pytest

from cli.common import DEFAULT_MODEL
from lite.sampling import SEED_MAX

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="the bundled demo model is not built")


def one_error_line(result, code: int = 2) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--temp", "inf"), "error: --temp must be a finite number >= 0 (0 = greedy), got inf"),
        (("--temp", "nan"), "error: --temp must be a finite number >= 0 (0 = greedy), got nan"),
        (("--repeat-penalty", "0"), "error: --repeat-penalty must be a finite number > 0 (1 = off), got 0.0"),
        (("--seed", str(2**64)), f"error: --seed must be a whole number from 0 to {SEED_MAX}, got {2**64}"),
        (("--top-k", "-3"), "error: --top-k must be a whole number >= 0 (0 = off), got -3"),
        (("-n", "0"), "error: -n/--max-tokens must be a whole number >= 1, got 0"),
        (
            ("-t", "100000"),
            f"error: -t/--threads must be from 1 to {4 * (os.cpu_count() or 1)} (4 x the CPU count), got 100000",
        ),  # torch segfaults on that many threads
    ],
)
def test_bad_sampling_flags_are_one_line(lite, args, message):
    assert one_error_line(lite("run", "-p", "hi", *args, check=False)) == message


def test_a_64_bit_seed_is_accepted(lite):
    rec = json.loads(lite("run", "-p", "hi", "-n", "2", "--seed", str(SEED_MAX), "--json").stdout)
    assert rec["seed"] == SEED_MAX and rec["generated_tokens"] == 2


def test_invalid_utf8_on_stdin_is_replaced_and_reported(lite):
    r = lite("run", "-n", "3", "--temp", "0", "--json", stdin=b"Hello \xff\xfe\n")
    rec = json.loads(r.stdout)
    assert r.stderr == "note: the prompt was not valid UTF-8: 2 invalid bytes replaced with U+FFFD (\ufffd)\n"
    assert rec["prompt_tokens"] > 2 and rec["generated_tokens"] == 3
    clean = lite("run", "-n", "3", "--temp", "0", "--json", stdin=b"Hello \xef\xbf\xbd\xef\xbf\xbd\n")
    assert json.loads(clean.stdout)["tokens"] == rec["tokens"] and clean.stderr == ""  # same text, no note


def test_undecodable_argv_prompt_is_replaced(lite):
    r = lite("run", "-p", "Hi \udcff there", "-n", "2", "--temp", "0")
    assert r.stderr.startswith("note: the prompt was not valid UTF-8: 1 invalid byte replaced")


def test_unexpected_errors_are_one_line_with_a_pointer_to_debug(lite, monkeypatch):
    import cli.cmd_info

    def broken(args):
        raise RuntimeError("index 0 is out of bounds\nsecond line")

    monkeypatch.setattr(cli.cmd_info, "run", broken)
    line = one_error_line(lite("info", "x.gguf", check=False), code=1)
    assert line == (
        "error: unexpected RuntimeError: index 0 is out of bounds (a bug in lite; run again with --debug for the "
        "traceback)"
    )
    for args in (("--debug", "info", "x.gguf"), ("info", "x.gguf", "--debug")):
        r = lite(*args, check=False)
        assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "def broken" not in r.stderr
        assert r.stderr.rstrip().endswith(line)


def test_user_errors_show_the_traceback_only_with_debug(lite, tmp_path):
    missing = str(tmp_path / "missing.gguf")
    assert "not found" in one_error_line(lite("info", missing, check=False))
    r = lite("--debug", "info", missing, check=False)
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.rstrip().split("\n")[-1].startswith("error: ")


def test_version(capsys):
    from cli.main import main, version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"lite {version()}\n"
    assert version() not in ("", "unknown")  # the installed package's version
