"""`lite serve [MODEL]`: an OpenAI-compatible HTTP server (needs the `serve` extra: starlette and uvicorn)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
from contextlib import contextmanager

from rich.console import Console

from cli import common
from lite.errors import LiteError

DEFAULT_CACHE_MEM = "1GiB"
GRACEFUL_SHUTDOWN_S = 5  # on SIGTERM, requests in flight get this long to finish


def add_parser(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s: this machine only)")
    g.add_argument("--port", type=int, default=8080, help="TCP port; 0 picks a free one (%(default)s)")
    g.add_argument(
        "--api-key", metavar="KEY", default=os.environ.get("LITE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $LITE_API_KEY, else none)",
    )  # fmt: skip
    g.add_argument(
        "--max-queue", type=int, default=16, metavar="N",
        help="requests that may wait while one runs; more get 503 with Retry-After (%(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--cache-mem", metavar="SIZE", default=DEFAULT_CACHE_MEM,
        help="CPU memory for the prefix cache of recent conversations' latent caches, LRU; 0 = off (%(default)s)",
    )  # fmt: skip
    common.add_context_arg(p)
    common.add_sampling_args(p)
    common.add_offload_args(p)


def cache_bytes(value: str) -> int:
    from offload.planner import parse_size

    return int(value) if value.strip().isdigit() else int(parse_size(value, "--cache-mem") or 0)


def bind_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server is reachable from other machines without a key."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return f"warning: serving on {host} without --api-key: anyone who can reach this address can use the model"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port fails before the (slow) model load."""
    if not 0 <= port <= 65535:
        raise LiteError(f"--port must lie in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LiteError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)  # proto IPPROTO_TCP: asyncio then sets TCP_NODELAY on connections
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise LiteError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
    common.sampling_params(args)  # bad flags fail before the (slow) load
    if args.max_queue < 0:
        raise LiteError(f"--max-queue must be >= 0, got {args.max_queue}")
    cache_mem = cache_bytes(args.cache_mem)
    try:
        import uvicorn

        from lite.serve.app import create_app
    except ImportError as e:
        raise LiteError(f'lite serve needs the serve extra ({e.name} is missing): pip install -e ".[serve]"') from None
    from lite.serve import Engine

    sock = bind(args.host, args.port)
    try:
        model, path = common.load_model(args, console)
        params = common.sampling_params(args, getattr(model, "metadata", None))
        ctx = common.context_size(args, model)
        engine = Engine(
            model, ctx=ctx, defaults=params, max_tokens=args.max_tokens, max_queue=args.max_queue,
            cache_bytes=cache_mem,
        )  # fmt: skip
        app = create_app(engine, model_id=path.stem, created=int(path.stat().st_mtime), api_key=args.api_key)
        console.print(common.header_line(path, model, ctx), style="bold")
        warning = bind_warning(args.host, args.api_key)
        if warning:
            console.print(warning, style="yellow")
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"listening on http://{shown}:{port}/v1 (model {path.stem!r}; Ctrl+C to stop)", flush=True)
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )  # fmt: skip
        received: list[int] = []
        with quiet_signals(received):  # uvicorn shuts down gracefully on them, then re-raises them here
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    why = f" ({signal.Signals(received[0]).name})" if received else ""
    print(f"stopped{why}", file=sys.stderr, flush=True)
    return 0


@contextmanager
def quiet_signals(received: list[int]):
    """While serving, SIGINT and SIGTERM only end the server (uvicorn's graceful shutdown): afterwards the
    command exits 0 instead of dying of the signal uvicorn raises again."""
    previous = {sig: signal.signal(sig, lambda s, _: received.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
