"""Drive a long `lite chat` session through a pseudo-terminal (pexpect) and sample its resident memory (psutil).

`soak()` runs the turns (short user turns; the context fills and the chat drops its oldest turns, as in a long real
conversation; a /clear every `clear_every` turns, a /regen every 50th) and counts errors (an `error:` line, a
missing footer, a timeout, the process dying). tests/test_chat_soak.py runs it shortened; benchmarks/soak_chat.py
is the long run from the command line.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pexpect
import psutil

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ">>> "
FOOTER = re.compile(r"prompt (\d+) tok .*? gen (\d+) tok .*?· ctx (\d+)/(\d+) · expert hits \S+ · peak RSS [^\r\n]+")
LINES = [
    "Good morrow, who art thou?",
    "What news from the court?",
    "Speak of the king.",
    "Wherefore dost thou weep?",
    "I pray you, tell me more.",
    "How fares the queen today?",
    "Shall we go hunt?",
    "What say you to this?",
    "Is the battle won?",
    "Come, sit with me a while.",
]


def spawn(model: str | None, max_tokens: int | None, extra: list[str], history: str, timeout: float,
          env: dict[str, str] | None = None) -> pexpect.spawn:  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    base.update({"PYTHONPATH": str(ROOT), "NO_COLOR": "1", "TERM": "xterm", "COLUMNS": "250", "LITE_HISTORY": history})
    cmd = ["-m", "cli.main", "chat", *([model] if model else []),
           *(["-n", str(max_tokens)] if max_tokens else []), "--seed", "1", *extra]  # fmt: skip
    child = pexpect.spawn(sys.executable, cmd, cwd=str(ROOT), env={**base, **(env or {})}, encoding="utf-8",
                          codec_errors="replace", timeout=timeout, dimensions=(50, 250))  # fmt: skip
    child.expect(PROMPT)
    return child


def soak(
    turns: int,
    every: int = 10,
    clear_every: int = 250,
    max_tokens: int | None = None,
    model: str | None = None,
    extra: list[str] | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    progress: bool = False,
) -> dict:
    """Run the chat for `turns` turns; returns {"samples": [{"turn", "rss", "t"}], "errors": [...], counts}."""
    history = tempfile.NamedTemporaryFile(prefix="lite_soak_history_", delete=False).name
    child = spawn(model, max_tokens, extra or [], history, timeout, env)
    proc = psutil.Process(child.pid)
    samples: list[dict] = [{"turn": 0, "rss": proc.memory_info().rss, "t": 0.0}]
    errors: list[str] = []
    drops = clears = regens = 0
    t0 = time.monotonic()
    try:
        for turn in range(1, turns + 1):
            if clear_every and turn % clear_every == 0:
                child.sendline("/clear")
                child.expect(PROMPT)
                clears += 1
            text = "/regen" if turn % 50 == 25 else f"{LINES[turn % len(LINES)]} ({turn})"
            regens += text == "/regen"
            child.sendline(text)
            try:
                child.expect(FOOTER)
                before = child.before
                child.expect(PROMPT)
            except pexpect.TIMEOUT:
                errors.append(f"turn {turn}: no reply within {timeout:g} s")
                child.sendintr()
                child.expect(PROMPT)
                continue
            if "error:" in before:
                errors.append(f"turn {turn}: " + before[before.index("error:") :].splitlines()[0])
            drops += "dropped the oldest" in before
            if turn % every == 0:
                samples.append({"turn": turn, "rss": proc.memory_info().rss, "t": round(time.monotonic() - t0, 1)})
                if progress and turn % (10 * every) == 0:
                    print(f"turn {turn:5d}  RSS {samples[-1]['rss'] / 2**20:7.1f} MiB  {samples[-1]['t']:7.1f} s  "
                          f"errors {len(errors)}", file=sys.stderr, flush=True)  # fmt: skip
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    except (pexpect.EOF, pexpect.TIMEOUT) as e:
        errors.append(f"the chat ended or hung: {type(e).__name__}")
    finally:
        child.close(force=True)
        Path(history).unlink(missing_ok=True)
    if child.exitstatus not in (0, None) or child.signalstatus is not None:
        errors.append(f"exit status {child.exitstatus}, signal {child.signalstatus}")
    return {"samples": samples, "errors": errors, "drops": drops, "clears": clears, "regens": regens}


def rss_at(samples: list[dict], turn: int) -> int:
    """RSS at the last sample taken at or before `turn`."""
    return [s for s in samples if s["turn"] <= turn][-1]["rss"]
