"""`lite convert` under signals and OS errors, and with a malformed tokenizer: one line, no file left behind."""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path

import pytest


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def interrupt_on_chunk(monkeypatch, n: int, action) -> None:
    """Run `action()` while the converter writes its `n`-th chunk of tensor data (mid-file)."""
    from lite.convert import writer as convert

    real = convert._write_chunk
    calls = {"n": 0}

    def chunk(fout, raw):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        real(fout, raw)

    monkeypatch.setattr(convert, "_write_chunk", chunk)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signals_remove_the_temporary_file(hf_lite, tmp_path, lite, monkeypatch, name, code):
    sig = getattr(signal, name)
    before = signal.getsignal(sig)
    interrupt_on_chunk(monkeypatch, 5, lambda: os.kill(os.getpid(), sig))
    r = lite("convert", str(hf_lite), "-o", str(tmp_path / "m.gguf"), check=False)
    assert r.returncode == code, r.stderr
    assert r.stderr.strip() == ("interrupted" if name == "SIGINT" else f"terminated by {name}")  # after the bar
    assert leftovers(tmp_path) == []  # neither m.gguf nor .m.gguf.PID.tmp
    assert signal.getsignal(sig) is before  # the previous handler is back


@pytest.mark.parametrize(
    "err, message",
    [
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only; write elsewhere with -o"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied; write elsewhere with -o, or fix"),
        (OSError(errno.EIO, "Input/output error"), "Input/output error; write elsewhere with -o"),
    ],
)
def test_os_errors_opening_the_output_are_one_line(hf_lite, tmp_path, lite, monkeypatch, err, message):
    import gguf

    out = tmp_path / "m.gguf"

    def refuse(self, path=None):
        err.filename = str(path)
        raise err

    monkeypatch.setattr(gguf.GGUFWriter, "write_header_to_file", refuse)
    r = lite("convert", str(hf_lite), "-o", str(out), check=False)
    assert r.returncode == 2 and r.stderr.strip().startswith(f"error: cannot write {out}: {message}")
    assert r.stderr.strip().count("\n") == 0 and leftovers(tmp_path) == []


def test_disk_full_mid_file(hf_lite, tmp_path, lite, monkeypatch):
    out = tmp_path / "m.gguf"

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    interrupt_on_chunk(monkeypatch, 3, full)
    r = lite("convert", str(hf_lite), "-o", str(out), check=False)
    assert (r.returncode, r.stderr.strip()) == (
        2, f"error: disk full while writing {out}; free some space or write elsewhere with -o"
    )  # fmt: skip
    assert leftovers(tmp_path) == []


def test_unreadable_checkpoint(hf_lite, tmp_path, lite, monkeypatch):
    from lite.convert import sources as convert_sources

    shard = next(hf_lite.glob("*.safetensors"))

    def refuse(path, framework):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(convert_sources, "safe_open", refuse)
    r = lite("convert", str(hf_lite), "-o", str(tmp_path / "m.gguf"), check=False)
    assert (r.returncode, r.stderr.strip()) == (
        2, f"error: cannot read {shard}: Permission denied; check the input and its permissions"
    )  # fmt: skip
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "file, content, reason",
    [
        ("tokenizer.json", "{not json", "key must be a string at line 1 column 2"),
        ("tokenizer.json", "{}", "Model missing. at line 1 column 2"),
        (
            "tokenizer_config.json",
            "{bad",
            "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
    ],
)
def test_malformed_tokenizer_is_one_line(hf_lite, tmp_path, lite, file, content, reason):
    from tiny_tokenizer import write_tiny_tokenizer

    hf = tmp_path / "hf"
    hf.mkdir()
    for f in hf_lite.iterdir():  # the weights by link, the small files copied
        (hf / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, hf / f.name)
    write_tiny_tokenizer(hf)
    (hf / file).write_text(content)
    out = tmp_path / "m.gguf"
    r = lite("convert", str(hf), "-o", str(out), check=False)
    assert (r.returncode, r.stderr.strip()) == (
        2,
        f"error: cannot read the tokenizer in {hf} ({reason}); fix or re-download tokenizer.json and "
        "tokenizer_config.json, or remove tokenizer.json to convert without a tokenizer",
    )
    assert not out.exists()
