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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the driver: tests/soak.py
from soak import rss_at, soak  # noqa: E402


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
