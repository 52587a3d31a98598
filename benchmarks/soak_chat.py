"""A long `lite chat` session through a pseudo-terminal: does memory stay flat, does every turn work?

Drives `lite chat` (the bundled demo model unless --model; the chat's defaults, --seed 1) with pexpect for
--turns short user turns (the context fills and the chat drops its oldest turns, as in a long real conversation;
every --clear-every turns a /clear starts over, and every 50th turn is a /regen), samples the chat process's
resident memory (psutil) every --every turns, counts errors (an `error:` line, a missing footer, a timeout, the
process dying), and prints the RSS curve and the ratio of the last sample to the one at --ref turns.

    python benchmarks/soak_chat.py                           # 1,000 turns, ~5 minutes on 2 cores
    python benchmarks/soak_chat.py --turns 200 --json soak.json

Exit status 0 when there were no errors and RSS at the end is within --tolerance (10%) of RSS at --ref.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf file (default: the bundled demo model)")
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--every", type=int, default=10, help="sample RSS every N turns (10)")
    ap.add_argument("--ref", type=int, default=100, help="the turn whose RSS the end is compared with (100)")
    ap.add_argument("--clear-every", type=int, default=250, help="/clear every N turns; 0 = never (250)")
    ap.add_argument("-n", "--max-tokens", type=int, default=None, help="most tokens per reply (the chat's: 512)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a turn may take (120)")
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed RSS growth from --ref to the end (0.10)")
    ap.add_argument("--json", metavar="FILE", help="also write the samples and errors as JSON")
    ap.add_argument("extra", nargs="*", help="more `lite chat` flags, after --")
    args = ap.parse_args()

    r = soak(args.turns, args.every, args.clear_every, args.max_tokens, args.model, args.extra, args.timeout,
             progress=True)  # fmt: skip
    samples, errors = r["samples"], r["errors"]
    last = samples[-1]
    ratio = last["rss"] / rss_at(samples, args.ref)
    print(f"\n{last['turn']} turns in {last['t']:.0f} s, {len(errors)} errors; {r['drops']} turns dropped the oldest "
          f"turns, {r['clears']} /clear, {r['regens']} /regen")  # fmt: skip
    print("| turn | RSS MiB |")
    print("| ---: | ---: |")
    marks = {0, 1, 10, 50, args.ref} | set(range(0, args.turns + 1, max(args.turns // 10, 1)))
    for s in samples:
        if s["turn"] in marks or s is last:
            print(f"| {s['turn']} | {s['rss'] / 2**20:.1f} |")
    peak = max(s["rss"] for s in samples)
    print(f"RSS at turn {last['turn']} / turn {args.ref}: {ratio:.3f}  (peak {peak / 2**20:.1f} MiB)")
    for e in errors[:20]:
        print("error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps({**r, "ratio": ratio}, indent=1))
    return 0 if not errors and ratio <= 1 + args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
