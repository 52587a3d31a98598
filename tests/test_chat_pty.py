"""`lite chat` driven through a pseudo-terminal (pexpect): streaming, every slash command, multi-line input,
bracketed paste, Ctrl+C during a reply, context overflow, Ctrl+C twice and Ctrl+D to exit."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from cli_models import tiny_chat_model

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ">>> "
FOOTER = re.compile(
    r"prompt (\d+) tok .*? gen (\d+) tok .*?TTFT (?:\d+ ms|–) · ctx (\d+)/(\d+) · expert hits \S+ · peak RSS \d"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("pty_models"))[0]


def spawn(model: Path | None, tmp_path: Path, *args: str, **extra_env: str):
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "TERM": "xterm", "COLUMNS": "250",
        "LITE_HISTORY": str(tmp_path / "history"),
        "OMP_NUM_THREADS": "1",  # tiny model: one thread is fastest, and robust on a busy machine
        **extra_env,
    }  # fmt: skip
    child = pexpect.spawn(
        sys.executable, ["-m", "cli.main", "chat", *([str(model)] if model else []), *args], cwd=str(ROOT), env=env,
        encoding="utf-8", codec_errors="replace", timeout=120, dimensions=(50, 250),
    )  # fmt: skip
    child.expect(PROMPT)
    return child


def say(child, text: str) -> re.Match:
    """Send a message; wait for the footer of its reply and the next prompt."""
    child.sendline(text)
    child.expect(FOOTER)
    m = child.match
    child.expect(PROMPT)
    return m


def command(child, text: str) -> str:
    child.sendline(text)
    child.expect(PROMPT)
    return child.before


def test_chat_session(tiny, tmp_path):
    child = spawn(tiny, tmp_path, "--temp", "0", "-n", "24", "-c", "512", "--system", "You are terse.")
    header = child.before
    assert "ctx 512" in header and "F32" in header and "bits/weight" in header and "experts/layer resident" in header

    m = say(child, "Hello there")  # a streamed reply with its footer
    assert int(m.group(4)) == 512 and int(m.group(2)) > 0
    first_ctx = int(m.group(3))

    assert "/regen" in command(child, "/help")
    assert "(temp = 0.5)" in command(child, "/set temp 0.5")
    assert re.search(r"temp\s+0\.5", command(child, "/show"))
    assert "top_p" in command(child, "/set top_p 2")  # out of range: an error line, the chat goes on
    command(child, "/set temp 0")
    command(child, "/set max_tokens 8")

    m = say(child, "/regen")  # rewinds to the prompt: only the last prompt token is prefilled again
    assert int(m.group(1)) == 1 and int(m.group(2)) <= 8

    assert "context:" in command(child, "/stats")
    saved = tmp_path / "conv.json"
    assert "(saved 3 messages" in command(child, f"/save {saved}")
    assert "(new conversation)" in command(child, "/clear")
    assert "(loaded 3 messages" in command(child, f"/load {saved}")
    m = say(child, "And now?")  # the loaded conversation is prefilled, then answered
    assert int(m.group(3)) > first_ctx // 2

    child.sendline('"""')  # a multi-line message between triple quotes
    child.sendline("line one")
    child.sendline('line two"""')
    child.expect(FOOTER)
    child.expect(PROMPT)
    # bracketed paste: a pasted block with a newline arrives as one message
    child.send("\x1b[200~pasted one\npasted two\x1b[201~")
    child.send("\r")
    child.expect(FOOTER)
    child.expect(PROMPT)
    command(child, "/system Be kind.")
    command(child, f"/save {saved}")
    messages = json.loads(saved.read_text())["messages"]
    assert messages[0] == {"role": "system", "content": "Be kind."}
    assert messages[-4]["content"] == "line one\nline two"
    assert messages[-2]["content"] == "pasted one\npasted two"

    # Ctrl+C during a long reply stops it and keeps the conversation
    command(child, "/set max_tokens 400")
    child.sendline("Tell me a long story")
    child.expect("story")  # the echo, then readline leaving bracketed-paste mode, then the reply streams
    child.expect(r"\x1b\[\?2004l")
    child.expect(r"[^\s\x1b]")
    child.sendintr()
    child.expect(r"\[stopped\]|\[cut: ")  # stopped (or, on a very fast machine, already finished)
    stopped = child.after == "[stopped]"
    child.expect(FOOTER)
    child.expect(PROMPT)
    m = say(child, "Still there?")
    assert int(m.group(1)) > 0
    command(child, f"/save {saved}")
    messages = json.loads(saved.read_text())["messages"]
    assert messages[-4]["content"] == "Tell me a long story" and messages[-3]["role"] == "assistant"
    assert messages[-3]["content"] or not stopped  # a stopped reply is kept as it was

    child.send("\x1b[A\r")  # arrow up recalls the last input (/save), Enter runs it again
    child.expect(r"\(saved \d+ messages")
    child.expect(PROMPT)

    # Ctrl+C at the prompt warns, a second one exits
    child.sendintr()
    child.expect("Ctrl\\+C again")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Hello there" in (tmp_path / "history").read_text()  # arrow-key history is kept


def test_bad_input_never_ends_the_chat(tiny, tmp_path):
    """Invalid UTF-8 typed at the prompt and a /set that would break sampling: each says why, the chat goes on."""
    # stdin strict, as under a UTF-8 locale such as en_US.UTF-8 (the C locale would already escape bad bytes)
    child = spawn(tiny, tmp_path, "--temp", "0", "-n", "4", PYTHONIOENCODING="utf-8:strict")
    os.write(child.child_fd, b"Hello \xff there\r")  # a byte that is not UTF-8, typed at the prompt
    child.expect("the message was not valid UTF-8: 1 invalid byte replaced with U\\+FFFD")
    child.expect(FOOTER)
    child.expect(PROMPT)
    assert "error: temp must be a finite number >= 0" in command(child, "/set temp inf")
    assert "error: repeat_penalty must be a finite number > 0" in command(child, "/set repeat_penalty 0")
    m = say(child, "Still here?")
    assert int(m.group(2)) > 0
    saved = tmp_path / "c.json"
    assert f"(saved 4 messages to {saved})" in command(child, f"/save {saved}")
    assert json.loads(saved.read_text())["messages"][0]["content"] == "Hello \ufffd there"
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_context_overflow_and_ctrl_d(tiny, tmp_path):
    # also: experts offloaded to RAM behind 2 device slots per layer (CPU device tier), shown in the header
    child = spawn(tiny, tmp_path, "--temp", "0", "-n", "12", "-c", "80", "--experts-on", "ram", "--gpu-mem", "6MiB")
    assert re.search(r"\d/8 expert slots/layer on cpu, the rest in ram", child.before)
    dropped = False
    for i in range(6):
        child.sendline(f"Question number {i}: what now?")
        child.expect(FOOTER)
        used, ctx = int(child.match.group(3)), int(child.match.group(4))
        assert ctx == 80 and used <= 80
        assert re.search(r"expert hits \d+% · peak", child.after)  # this turn's hit rate
        before = child.before
        dropped = dropped or "dropped the oldest" in before
        assert "[cut: max tokens reached]" in before or "[cut: context full]" in before or used < 80
        child.expect(PROMPT)
    assert dropped
    assert re.search(r"prefetch_precision\s+\S+", command(child, "/stats"))
    child.sendeof()  # Ctrl+D exits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_bundled_demo_model_chats(tmp_path):
    from cli.common import DEFAULT_MODEL

    if not DEFAULT_MODEL.is_file():
        pytest.skip(f"{DEFAULT_MODEL} is not built yet (issue 6); `lite chat` then explains how to get a model")
    child = spawn(None, tmp_path, "--temp", "0", "-n", "16")  # no MODEL: the bundled demo model
    assert "ctx " in child.before
    say(child, "Hello, who are you?")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
