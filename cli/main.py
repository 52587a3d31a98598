"""The `lite` command: a thin dispatcher. Each subcommand lives in its own module `cli/cmd_<name>.py`
exposing `add_parser(subparsers)` and `run(args) -> int`.

`main` is the one guard around every subcommand: a `LiteError` prints one `error: …` line and exits 2;
anything unexpected prints a one-line summary with a pointer to `--debug` (which shows the traceback) and
exits 1; Ctrl+C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

COMMANDS = {
    "chat": "Chat with a model in the terminal",
    "run": "Generate once from a prompt and stream to stdout",
    "serve": "Serve the model over an OpenAI-compatible HTTP API",
    "convert": "Convert a Hugging Face DeepSeek-V2/V3-family checkpoint (bf16, fp8), or a GGUF, to GGUF with a recipe",
    "info": "Show a GGUF file's metadata, tensor types and sizes",
    "plan": "Plan where weights go for given memory budgets (reads metadata only)",
    "bench": "Measure prompt and decode speed and expert-cache statistics",
    "perplexity": "Chunked perplexity of a model over a text file",
}


def version() -> str:
    """The installed package's version (pyproject.toml's), or "unknown" when lite is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lite")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lite", description="Chat with DeepSeek-V2/V3-class MoE models on one GPU.")
    parser.add_argument("--version", action="version", version=f"lite {version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    debug = argparse.ArgumentParser(add_help=False)  # --debug also after the subcommand (default: keep lite's)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an unexpected error"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"cli.cmd_{name}")  # a missing command module is a broken install: loud
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[debug])
        module.add_parser(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    from cli.common import Terminated, unexpected, user_message
    from lite.errors import LiteError

    debug = bool(getattr(args, "debug", False))
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated as e:  # SIGTERM/SIGHUP where a command asked for a clean exit (lite convert)
        try:
            print(f"terminated by {e}", file=sys.stderr)
        except OSError:  # SIGHUP: the terminal may be gone
            pass
        return 128 + e.signum
    except BrokenPipeError:  # e.g. `lite run … | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except LiteError as e:  # a user error: one clear line naming the fix
        if debug:
            traceback.print_exc()
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(unexpected(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
