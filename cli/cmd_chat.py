"""`lite chat [MODEL]`: an interactive conversation in the terminal."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cli import common
from lite.chat import Chat, TurnStats
from lite.errors import LiteError

HELP = """\
/help                 this list
/exit, /bye           leave (also Ctrl+D, or Ctrl+C twice at the prompt)
/clear                start a new conversation (keeps the system prompt)
/regen                answer the last message again
/system [TEXT]        set the system prompt (empty: remove it); starts using it from the next reply
/set NAME VALUE       change a setting: temp, top_p, top_k, min_p, max_tokens, seed, repeat_penalty
/show                 the current settings
/stats                expert-cache and prefetch statistics (model.stats())
/save FILE            save the conversation as JSON
/load FILE            restore a conversation saved with /save
\"\"\"                   start or end a multi-line message (pasting several lines also works)
Ctrl+C during a reply stops it and keeps the conversation."""

FINISH = {"length": "[cut: max tokens reached]", "context": "[cut: context full]", "interrupted": "[stopped]"}


def add_parser(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p)
    p.add_argument("--system", metavar="TEXT", help="system prompt (change it later with /system)")
    common.add_context_arg(p)
    common.add_sampling_args(p)
    common.add_offload_args(p)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "In the chat:\n" + HELP


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False, markup=False, soft_wrap=True)
    common.sampling_params(args)  # bad flags fail before the (slow) load
    model, path = common.load_model(args, console)
    params = common.sampling_params(args, getattr(model, "metadata", None))
    ctx = common.context_size(args, model)
    chat = Chat(model, system=args.system, params=params, max_tokens=args.max_tokens, ctx=ctx)
    console.print(common.header_line(path, model, ctx), style="bold")
    console.print('/help for commands · """ for several lines · Ctrl+D to exit', style="dim")
    history = setup_readline()
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes reach Chat.send as surrogates, not an exception
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        repl(chat, console, debug=bool(getattr(args, "debug", False)))
    finally:
        save_history(history)
    return 0


def setup_readline() -> str | None:
    """Arrow-key editing and history, and bracketed paste (a pasted block arrives as one message)."""
    try:
        import readline
    except ImportError:  # no readline (e.g. Windows): plain input still works
        return None
    readline.parse_and_bind("set enable-bracketed-paste on")
    path = os.environ.get("LITE_HISTORY", str(Path.home() / ".lite_history"))
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    return path


def save_history(path: str | None) -> None:
    if path:
        import readline

        try:
            readline.write_history_file(path)
        except OSError:
            pass


def read_message() -> str:
    """One message (EOFError on Ctrl+D). A line starting with \"\"\" opens a block that a \"\"\" closes."""
    line = input(">>> ")
    if not line.lstrip().startswith('"""'):
        return line
    first = line.lstrip()[3:]
    if first.rstrip().endswith('"""') and first.strip():
        return first.rstrip()[:-3]
    lines = [first] if first else []
    while True:
        line = input("... ")
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def repl(chat: Chat, console: Console, debug: bool = False) -> None:
    """Read and answer until /exit, Ctrl+D or Ctrl+C twice. No input ends the session: a failed command or
    turn prints why and leaves the conversation as it was before it."""
    interrupts = 0
    while True:
        try:
            text = read_message()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts >= 2:
                console.print()
                return
            console.print("\n(Ctrl+C again or Ctrl+D to exit)", style="dim")
            continue
        except UnicodeDecodeError:  # a stdin that could not be reconfigured
            console.print("error: the input was not valid UTF-8; type it again", style="red")
            continue
        interrupts = 0
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                if command(chat, console, text) == "exit":
                    return
            else:
                stream_reply(chat, console, chat.send(text))
        except LiteError as e:
            console.print(f"error: {common.user_message(e)}", style="red")
        except KeyboardInterrupt:
            console.print("(interrupted; the conversation is as it was)", style="yellow")
        except Exception as e:
            if debug:
                console.print(traceback.format_exc(), style="red")
            console.print(f"{common.unexpected(e)}; the conversation is as it was", style="red")


@contextmanager
def ctrl_c_stops(chat: Chat) -> Iterator[None]:
    """While a reply streams, Ctrl+C asks the chat to stop at the next token instead of raising."""
    previous = signal.signal(signal.SIGINT, lambda *_: chat.stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def no_echo(stream: Any = None) -> Iterator[None]:
    """While a reply streams, keys typed are not echoed into its text; they stay queued for the next prompt
    (readline shows them there). A no-op when `stream` (stdin) is not a terminal."""
    try:
        import termios

        fd = (stream or sys.stdin).fileno()
        old = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, ValueError, OSError):
        old = None
    if old is None:
        yield
        return
    quiet = list(old)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


def stream_reply(chat: Chat, console: Console, pieces: Any) -> None:
    out = sys.stdout
    try:
        with ctrl_c_stops(chat), no_echo():
            for piece in pieces:
                out.write(piece)
                out.flush()
    finally:
        out.write("\n")
        out.flush()
    s = chat.last
    if s is None:
        return
    for note in s.notes:
        console.print(note, style="yellow")
    if s.finish in FINISH:
        console.print(FINISH[s.finish], style="yellow")
    console.print(footer(s), style="dim")


def rate(tps: float | None) -> str:
    return f"{tps:.1f} tok/s" if tps else "–"


def footer(s: TurnStats) -> str:
    """One line after a reply: this turn's tokens, speeds and hit rate; the process's peak memory so far."""
    hit = f"{100 * s.hit_rate:.0f}%" if s.hit_rate is not None else "n/a"
    ttft = f"{1000 * s.ttft:.0f} ms" if s.gen_tokens else "–"  # nothing generated: no first token
    peak = f"peak RSS {common.human_bytes(s.peak_rss)}" + (
        f" · peak GPU {common.human_bytes(s.peak_gpu)}" if s.peak_gpu else ""
    )
    return (
        f"prompt {s.prompt_tokens} tok {rate(s.prompt_tps)} · gen {s.gen_tokens} tok {rate(s.gen_tps)} · "
        f"TTFT {ttft} · ctx {s.ctx_used}/{s.ctx} · expert hits {hit} · {peak}"
    )


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def command(chat: Chat, console: Console, text: str) -> str | None:
    name, _, rest = text.strip().partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/bye", "/quit"):
        return "exit"
    if name in ("/help", "/?"):
        console.print(HELP, markup=False)
    elif name == "/clear":
        chat.clear()
        console.print("(new conversation)", style="dim")
    elif name == "/regen":
        stream_reply(chat, console, chat.regenerate())
    elif name == "/system":
        chat.set_system(rest or None)
        console.print(f"(system prompt: {rest})" if rest else "(system prompt removed)", style="dim")
    elif name == "/set":
        key, _, value = rest.partition(" ")
        if not key or not value.strip():
            raise LiteError("usage: /set NAME VALUE, e.g. /set temp 0.2")
        chat.set(key, value.strip())
        console.print(f"({key} = {value.strip()})", style="dim")
    elif name == "/show":
        show_settings(chat, console)
    elif name == "/stats":
        show_stats(chat, console)
    elif name in ("/save", "/load"):
        if not rest:
            raise LiteError(f"usage: {name} FILE")
        if name == "/save":
            chat.save(rest)
            console.print(f"(saved {plural(len(chat.messages), 'message')} to {rest})", style="dim")
        else:
            n = chat.load(rest)
            console.print(f"(loaded {plural(n, 'message')} from {rest})", style="dim")
    else:
        raise LiteError(f"unknown command {name}; /help lists the commands")
    return None


def show_settings(chat: Chat, console: Console) -> None:
    table = Table(show_header=False, box=None)
    for k, v in chat.settings().items():
        table.add_row(k, str(v))
    table.add_row("system", chat.system or "(none)")
    table.add_row("messages", str(len(chat.messages)))
    console.print(table)


def show_stats(chat: Chat, console: Console) -> None:
    stats = chat.model.stats()
    total = stats.get("total") if isinstance(stats, dict) else None
    console.print(f"context: {len(chat.session.tokens)}/{chat.ctx} tokens in the latent cache")
    if not total:
        console.print("the expert backend keeps no statistics (all experts resident)", style="dim")
        return
    table = Table(title="expert cache (since start)", show_header=False)
    for k, v in total.items():
        table.add_row(k, common.stat_value(k, v))
    for k, v in stats.items():
        if k not in ("total", "layers") and not isinstance(v, (dict, list)):
            table.add_row(k, common.stat_value(k, v))
    console.print(table)
