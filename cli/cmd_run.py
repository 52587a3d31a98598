"""`lite run [MODEL] -p PROMPT`: generate once and stream to stdout (prompt from stdin when -p is absent)."""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch
from rich.console import Console

from cli import common
from lite.chat import Chat, TurnStats
from lite.errors import LiteError
from lite.generate import stream_generate
from lite.text import decode_input, replaced_note, scrub


def add_parser(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p)
    p.add_argument("-p", "--prompt", help="the prompt (default: read from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    p.add_argument("--system", metavar="TEXT", help="system prompt (with --chat)")
    p.add_argument(
        "--json", action="store_true",
        help="print one JSON record (text, token counts, timings) instead of streaming",
    )  # fmt: skip
    common.add_context_arg(p)
    common.add_sampling_args(p, max_tokens=256)
    common.add_offload_args(p)


def read_prompt(args: argparse.Namespace, console: Console) -> str:
    """-p, or stdin read as bytes; invalid UTF-8 (in either) is replaced with U+FFFD and reported, never fatal."""
    if args.prompt is not None:
        text, bad = scrub(args.prompt)  # argv carries undecodable bytes as surrogates
    elif sys.stdin.isatty():
        raise LiteError("no prompt; pass -p PROMPT or pipe the prompt on stdin")
    elif getattr(sys.stdin, "buffer", None) is not None:
        text, bad = decode_input(sys.stdin.buffer.read())
    else:  # a text stream without bytes underneath (tests, embedding)
        text, bad = scrub(sys.stdin.read())
    if bad:
        console.print(f"note: {replaced_note(bad, 'the prompt')}", style="yellow")
    return text


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, highlight=False, markup=False)
    common.sampling_params(args)  # bad flags fail before the (slow) load
    prompt_text = read_prompt(args, console)
    if args.system and not args.chat:
        raise LiteError("--system needs --chat (a raw prompt has no system turn)")
    model, path = common.load_model(args, console)
    params = common.sampling_params(args, getattr(model, "metadata", None))
    if model.tokenizer is None:
        raise LiteError(f"{path.name} has no tokenizer; convert it from a folder with tokenizer.json")
    ctx = common.context_size(args, model)
    if args.chat:
        chat = Chat(model, system=args.system, params=params, max_tokens=args.max_tokens, ctx=ctx)
        pieces = chat.send(prompt_text)
        stats_of = lambda: chat.last  # noqa: E731
        seed = chat.seed
    else:
        stats = TurnStats(ctx=ctx)
        prompt = model.tokenizer.encode(prompt_text, add_bos=True)
        if len(prompt) >= ctx:
            raise LiteError(f"the prompt is {len(prompt)} tokens but the context holds {ctx}; raise -c/--ctx-size")
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        records = stream_generate(
            model, prompt, params, max_tokens=args.max_tokens, session=model.session(ctx),
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        pieces = stats.texts(records)
        stats_of = lambda: stats  # noqa: E731
    if args.json:
        for _ in pieces:
            pass
    else:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    s = stats_of()
    assert s is not None  # the generator ran to its end: the turn's statistics are in
    if args.json:
        record = {
            "model": str(path),
            "text": s.text,
            "finish": s.finish,
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.gen_tokens,
            "tokens": s.token_ids,
            "prompt_seconds": round(s.prompt_seconds, 6),
            "generation_seconds": round(s.gen_seconds, 6),
            "ttft_seconds": round(s.ttft, 6) if s.gen_tokens else None,
            "prompt_tokens_per_second": s.prompt_tps,
            "generation_tokens_per_second": s.gen_tps,
            "expert_cache_hit_rate": s.hit_rate,
            "peak_rss_bytes": s.peak_rss,
            "seed": seed,
        }
        print(json.dumps(record, ensure_ascii=False))
    elif s.finish == "length":
        console.print("[cut: max tokens reached]", style="yellow")
    elif s.finish == "context":
        console.print("[cut: context full]", style="yellow")
    return 0
