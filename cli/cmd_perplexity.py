"""`lite perplexity MODEL FILE`: chunked perplexity over a text file, like llama-perplexity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cli import budget, common
from lite.errors import LiteError
from lite.perplexity import perplexity

PPL_CTX = 512  # llama-perplexity's usual chunk


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a .gguf file")
    p.add_argument("file", metavar="FILE", help="a UTF-8 text file (e.g. wikitext-2's wiki.test.raw)")
    p.add_argument(
        "--ctx", type=int, default=None, metavar="N",
        help="tokens per chunk; the second half is scored (512 or the model's context, the smaller)",
    )  # fmt: skip
    p.add_argument("--chunks", type=int, default=None, metavar="N", help="score at most N >= 1 chunks (default: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_offload_args(p)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, highlight=False, markup=False)
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as e:
        raise LiteError(f"cannot read {args.file}: {e.strerror}; pass a text file") from None
    except UnicodeDecodeError:
        raise LiteError(f"{args.file} is not UTF-8 text; pass a UTF-8 text file") from None
    if args.chunks is not None and args.chunks < 1:
        raise LiteError(f"--chunks must be at least 1, got {args.chunks}; leave it out to score every chunk")
    model, path = common.load_model(args, console, ctx=args.ctx, ctx_flag="--ctx", ctx_default=PPL_CTX)
    args.ctx = budget.resolve_ctx(args.ctx, int(model.max_context), "--ctx", PPL_CTX)
    tok = model.tokenizer
    if tok is None:
        raise LiteError(f"{path.name} has no tokenizer; convert it from a folder with tokenizer.json")
    tokens = tok.encode(text, add_bos=True)
    n_chunks = len(tokens) // args.ctx
    if n_chunks < 1:
        raise LiteError(f"the text has {len(tokens)} tokens, fewer than one chunk of {args.ctx}; use a smaller --ctx")
    if args.chunks is not None:
        n_chunks = min(n_chunks, args.chunks)
    columns = (TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("", total=max(n_chunks, 1))
        result = perplexity(
            model, tokens, args.ctx, args.chunks, bos_id=tok.bos_id,
            progress=lambda i, n, ppl: bar.update(task, completed=i, description=f"ppl {ppl:.4f}"),
        )  # fmt: skip
    if args.json:
        print(json.dumps({"model": str(path), "file": args.file, **result.__dict__}))
    else:
        print(" ".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(result.chunk_ppl)))
        print(
            f"perplexity: {result.ppl:.4f} ± {result.ppl_error:.4f} over {result.chunks} chunks of {result.ctx} "
            f"tokens ({result.tokens_scored} tokens scored, {len(tokens)} in the file)"
        )
    return 0
