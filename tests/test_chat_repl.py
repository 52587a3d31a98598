"""The chat REPL (cli/cmd_chat.py) in-process on a fake model: no input ends the session or loses the
conversation; the footer, counts and terminal echo (issue 11's small things)."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from fake_chat_model import FakeModel
from rich.console import Console

from cli import cmd_chat
from lite.chat import Chat, TurnStats, process_peak_rss
from lite.sampling import SamplingParams


class Failing(FakeModel):
    broken = False

    def next_logits(self, tokens):
        if self.broken:
            raise RuntimeError("device-side assert triggered")
        return super().next_logits(tokens)


def drive(chat: Chat, inputs: list[str], monkeypatch, debug: bool = False) -> str:
    """Run the REPL over `inputs` (then Ctrl+D); returns what it printed (console and streamed replies)."""
    lines = iter(inputs)

    def read_message() -> str:
        try:
            item = next(lines)
        except StopIteration:
            raise EOFError from None
        if callable(item):
            item = item()
        return item

    out = io.StringIO()
    monkeypatch.setattr(cmd_chat, "read_message", read_message)
    monkeypatch.setattr(sys, "stdout", out)
    cmd_chat.repl(chat, Console(file=out, highlight=False, markup=False, width=300), debug=debug)
    return out.getvalue()


def test_no_input_ends_the_session(monkeypatch, tmp_path):
    model = Failing("fine")
    chat = Chat(model, params=SamplingParams(temperature=0.0))

    def undecodable() -> str:  # what input() returns for b"caf\xe9" once stdin uses surrogateescape
        return b"caf\xe9 ok".decode("utf-8", "surrogateescape")

    def breaks() -> str:
        model.broken = True
        return "this turn fails"

    def heals() -> str:
        model.broken = False
        return "/show"

    printed = drive(chat, [
        "hello", "/set temp inf", "/set seed 99999999999999999999999", "/set", "/nope", "/load " + str(tmp_path),
        undecodable, breaks, "/regen", heals, "again",
    ], monkeypatch)  # fmt: skip
    assert "error: temp must be a finite number >= 0 (0 = greedy), got 'inf'" in printed
    assert "error: seed must be a whole number from 0 to 18446744073709551615" in printed
    assert "error: usage: /set NAME VALUE" in printed and "error: unknown command /nope" in printed
    assert f"error: cannot read {tmp_path}" in printed
    assert "the message was not valid UTF-8: 1 invalid byte replaced with U+FFFD" in printed
    unexpected = "error: unexpected RuntimeError: device-side assert triggered (a bug in lite; run again with --debug"
    assert printed.count(unexpected) == 2 and printed.count("the conversation is as it was") == 2  # turn and /regen
    assert "Traceback" not in printed
    assert [m["content"] for m in chat.messages] == ["hello", "fine", "caf\ufffd ok", "fine", "again", "fine"]
    assert chat.params.temperature == 0.0


def test_debug_shows_the_traceback_and_goes_on(monkeypatch):
    model = Failing("fine")
    model.broken = True
    chat = Chat(model, params=SamplingParams(temperature=0.0))
    printed = drive(chat, ["boom"], monkeypatch, debug=True)
    assert "Traceback (most recent call last)" in printed and "device-side assert triggered" in printed
    assert chat.messages == []


def test_footer():
    s = TurnStats(prompt_tokens=5, gen_tokens=0, ctx_used=5, ctx=64, peak_rss=3 << 30)
    assert cmd_chat.footer(s) == (
        "prompt 5 tok – · gen 0 tok – · TTFT – · ctx 5/64 · expert hits n/a · peak RSS 3.0 GiB"
    )
    s = TurnStats(gen_tokens=3, ttft=0.0614, cache_hits=3, cache_misses=1, peak_rss=1 << 30, peak_gpu=1 << 29)
    assert cmd_chat.footer(s).endswith("TTFT 61 ms · ctx 0/0 · expert hits 75% · peak RSS 1.0 GiB · peak GPU 512.0 MiB")


def test_peak_is_the_process_peak_and_never_goes_down():
    import psutil

    chat = Chat(FakeModel("ok"), params=SamplingParams(temperature=0.0))
    "".join(chat.send("one"))
    first = chat.last.peak_rss
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB more, touched, then freed
    with_block = psutil.Process().memory_info().rss
    high = process_peak_rss()
    del block
    "".join(chat.send("two"))
    assert first <= high and with_block <= high <= chat.last.peak_rss  # the next turn still reports it


def test_saved_and_loaded_counts_are_singular(tmp_path):
    chat = Chat(FakeModel(), system="sys")
    out = io.StringIO()
    console = Console(file=out, highlight=False, markup=False, width=300)
    path = tmp_path / "c.json"
    cmd_chat.command(chat, console, f"/save {path}")
    cmd_chat.command(chat, console, f"/load {path}")
    assert out.getvalue() == f"(saved 1 message to {path})\n(loaded 1 message from {path})\n"


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_keys_typed_during_a_reply_are_not_echoed():
    import termios

    master, slave = os.openpty()
    try:
        with os.fdopen(os.dup(slave), "r") as tty:
            assert termios.tcgetattr(slave)[3] & termios.ECHO
            with cmd_chat.no_echo(tty):
                assert not termios.tcgetattr(slave)[3] & termios.ECHO
                os.write(master, b"typed ahead\n")  # queued for the next prompt, not shown
            assert termios.tcgetattr(slave)[3] & termios.ECHO
            assert tty.readline() == "typed ahead\n"
        with cmd_chat.no_echo(io.StringIO()):  # not a terminal: nothing to do
            pass
    finally:
        os.close(master)
        os.close(slave)
