"""The `lite` command: a thin dispatcher. Each subcommand lives in its own module `cli/cmd_<name>.py`
exposing `add_parser(subparsers)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "chat": "Chat with a model in the terminal",
    "run": "Generate once from a prompt and stream to stdout",
    "serve": "Serve the model over an OpenAI-compatible HTTP API",
    "convert": "Convert a Hugging Face DeepSeek-V2 checkpoint to GGUF",
    "info": "Show a GGUF file's metadata, tensor types and sizes",
    "plan": "Plan where weights go for given memory budgets (reads metadata only)",
    "bench": "Measure prompt and decode speed and expert-cache statistics",
    "perplexity": "Chunked perplexity of a model over a text file",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lite", description="Chat with DeepSeek-V2-class MoE models on one GPU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"cli.cmd_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cli.cmd_{name}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_parser(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, never a traceback, for user-facing errors
        from lite.errors import LiteError

        if isinstance(e, LiteError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
