"""`lite serve` on the bundled demo model: the official openai client against a server on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from cli.common import DEFAULT_MODEL  # noqa: E402
from lite.serve.jobs import StopText  # noqa: E402
from lite.serve.prefix_cache import PrefixCache, common_prefix  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"
MAX_BODY = 64 * 1024
pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="the bundled demo model is missing")


class Server:
    def __init__(self, url: str, engine, server):
        self.url, self.engine, self.server = url, engine, server

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60, **kw)

    def post(self, path: str, body=None, key: str | None = KEY, timeout: float = 60, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=timeout, **kw)

    def get(self, path: str, key: str | None = KEY) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)

    def stats(self) -> dict:
        return self.get("/stats").json()

    def idle(self) -> None:
        until(lambda: not self.engine.busy() and not self.engine.queue_length(), "the server stayed busy")


def until(condition, what: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server():
    """The demo model served in this process (uvicorn in a thread), with an API key and a 64 KiB body limit."""
    import lite
    from cli import common
    from cli.cmd_serve import bind
    from cli.main import build_parser
    from lite.serve import Engine
    from lite.serve.app import create_app

    args = build_parser().parse_args(["serve", "-c", "512", "-n", "64", "--max-queue", "4", "--cache-mem", "1MiB"])
    model = lite.load(str(DEFAULT_MODEL), device="cpu")
    params = common.sampling_params(args, model.metadata)
    engine = Engine(model, ctx=512, defaults=params, max_tokens=64, max_queue=4, cache_bytes=1 << 20)
    app = create_app(engine, model_id="demo", api_key=KEY, max_body=MAX_BODY)
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    until(lambda: srv.started or not thread.is_alive(), "the server did not start", 60)
    assert srv.started
    yield Server(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, srv)
    srv.should_exit = True
    thread.join(10)
    sock.close()
    assert not thread.is_alive()


def lite_run_chat(message: str, n: int, capsys) -> dict:
    from cli.main import main

    capsys.readouterr()
    assert main(["run", "--chat", "--temp", "0", "-n", str(n), "-c", "512", "--json", "-p", message]) == 0
    return json.loads(capsys.readouterr().out)


def test_chat_greedy_equals_lite_run_streaming_and_not(server, capsys):
    message = "Good morrow, my lord. What news?"
    ref = lite_run_chat(message, 24, capsys)
    client = server.client()
    msgs = [{"role": "user", "content": message}]
    r = client.chat.completions.create(model="demo", messages=msgs, temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and r.model == "demo"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref["text"]
    assert r.choices[0].finish_reason == ref["finish"]
    assert r.usage.prompt_tokens == ref["prompt_tokens"] and r.usage.completion_tokens == len(ref["tokens"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="demo", messages=msgs, temperature=0, max_completion_tokens=24, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["text"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref["finish"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref["tokens"])
    # the same prompt again: all but its last token come from the cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == ref["prompt_tokens"] - 1


def test_completions_models_health_stats(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["demo"]
    assert client.models.retrieve("demo").owned_by == "lite"
    r = client.completions.create(model="demo", prompt="The king", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 3  # BOS + 2
    streamed = client.completions.create(model="demo", prompt="The king", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    ids = client.completions.create(model="demo", prompt=[0, 503, 2013], max_tokens=8, temperature=0)
    assert ids.usage.prompt_tokens == 3
    # a stop string cuts the text before it, with finish_reason "stop"
    full = client.completions.create(model="demo", prompt="The king", max_tokens=30, temperature=0).choices[0]
    stop = full.text[5:8]
    cut = client.completions.create(model="demo", prompt="The king", max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == full.text[: full.text.index(stop)] and cut.choices[0].finish_reason == "stop"
    seeded = [
        client.completions.create(model="demo", prompt="The", max_tokens=12, temperature=1.0, seed=7).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    pen = client.completions.create(
        model="demo", prompt="The", max_tokens=12, temperature=0, frequency_penalty=1.5, presence_penalty=0.5
    )
    assert pen.choices[0].finish_reason in ("stop", "length")
    assert server.get("/health", key=None).json() == {"status": "ok"}
    stats = server.stats()
    assert stats["requests"]["served"] >= 6 and stats["requests"]["queued"] == 0
    assert stats["experts"]["hit_rate"] == 1.0 and "prefetch_precision" in stats["experts"]
    assert stats["speed"]["decode_tokens_per_second"] > 0


def test_second_turn_prefills_only_the_new_tokens(server):
    client = server.client()
    msgs = [{"role": "user", "content": "Speak, sweet lady."}]
    first = client.chat.completions.create(model="demo", messages=msgs, temperature=0.8, max_tokens=20, seed=3)
    reply = first.choices[0].message.content
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And what of the king?"}]
    before = server.stats()["tokens"]
    second = client.chat.completions.create(model="demo", messages=msgs, temperature=0.8, max_tokens=20, seed=3)
    after = server.stats()["tokens"]
    held = first.usage.prompt_tokens + first.usage.completion_tokens - (first.choices[0].finish_reason == "length")
    assert second.usage.prompt_tokens_details.cached_tokens == held > 0
    tok = server.engine.tokenizer
    new = tok.encode(
        "<｜end▁of▁sentence｜>User: And what of the king?\n\nAssistant:", add_bos=False, parse_special=True
    )
    assert after["prefilled"] - before["prefilled"] == second.usage.prompt_tokens - held <= len(new) + 1


def test_interleaved_conversations_come_back_from_the_prefix_cache(server):
    client = server.client()
    long = "Now is the winter of our discontent made glorious summer by this sun of York. " * 2

    def ask(text: str):
        msgs = [{"role": "user", "content": text}]
        return client.chat.completions.create(model="demo", messages=msgs, temperature=0, max_tokens=4)

    a = ask("A: " + long)
    ask("B: something else entirely, " + long)  # overwrites the working session: A is saved first
    restored = server.stats()["prefix_cache"]["restored"]
    again = ask("A: " + long)
    assert again.usage.prompt_tokens_details.cached_tokens == a.usage.prompt_tokens - 1
    assert server.stats()["prefix_cache"]["restored"] == restored + 1


def test_four_concurrent_clients_all_finish(server):
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        client = server.client()
        msgs = [{"role": "user", "content": f"Client {i} asks: how fares the queen?"}]
        if i % 2:
            stream = client.chat.completions.create(model="demo", messages=msgs, max_tokens=16, seed=i, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=16, seed=i)
            results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [0, 1, 2, 3] and all(isinstance(v, str) for v in results.values())


def test_disconnect_mid_stream_cancels_within_a_token(server, monkeypatch):
    engine = server.engine
    feed = engine.session.feed

    def slow_feed(ids, *a, **kw):  # 20 ms a token: 400 tokens would take 8 s
        time.sleep(0.02)
        return feed(ids, *a, **kw)

    at_cancel: list[int] = []  # tokens in the cache when the disconnect was seen
    at_end: list[tuple[bool, int]] = []  # (cancelled, tokens in the cache) as each job ends
    cancel, process = engine.cancel, engine._process

    def record_cancel(job):
        at_cancel.append(len(engine.session.tokens))
        cancel(job)

    def record_end(job):
        process(job)
        at_end.append((job.cancelled, len(engine.session.tokens)))

    monkeypatch.setattr(engine.session, "feed", slow_feed)
    monkeypatch.setattr(engine, "cancel", record_cancel)
    monkeypatch.setattr(engine, "_process", record_end)
    server.idle()
    cancelled = server.stats()["requests"]["cancelled"]
    body = {"prompt": "The king", "max_tokens": 400, "temperature": 1.0, "top_k": 0, "seed": 1, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
        data = (line for line in r.iter_lines() if line.startswith("data: "))
        assert [json.loads(next(data)[6:])["choices"][0]["finish_reason"] for _ in range(3)] == [None] * 3
    t0 = time.monotonic()  # the client hung up: the next request starts at once
    r = server.client().completions.create(model="demo", prompt="Next", max_tokens=2, temperature=0)
    assert time.monotonic() - t0 < 3 and r.choices[0].finish_reason in ("stop", "length")
    assert at_end[0][0] and at_end[0][1] - at_cancel[0] <= 1  # stopped within one token of the disconnect
    assert at_end[0][1] < 100 and server.stats()["requests"]["cancelled"] == cancelled + 1


def test_errors_have_openai_shape(server, monkeypatch):
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

    def error(r: httpx.Response, status: int, param=None, code=None) -> dict:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param and (code is None or err["code"] == code), err
        return err

    for extra, param in [
        ({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"), ({"temperature": 3}, "temperature"),
        ({"top_p": "high"}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"),
        ({"logprobs": True}, "logprobs"), ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ]:  # fmt: skip
        error(server.post("/v1/chat/completions", {**chat, **extra}), 400, param)
    error(server.post("/v1/completions", {"prompt": ["a", "b"]}), 400, "prompt")
    error(server.post("/v1/completions", {"prompt": [99999]}), 400, "prompt")
    error(server.post("/v1/chat/completions", content=b"{not json", key=KEY), 400, code="invalid_json")
    error(server.post("/v1/chat/completions", content=b"[" * 50_000, key=KEY), 400, code="invalid_json")
    long = {"messages": [{"role": "user", "content": "word " * 600}]}
    err = error(server.post("/v1/chat/completions", long), 400, "messages", "context_length_exceeded")
    assert "512" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="demo", messages=long["messages"])
    assert e.value.code == "context_length_exceeded"
    error(server.post("/v1/chat/completions", chat, key=None), 401, code="missing_api_key")
    error(server.post("/v1/chat/completions", chat, key="wrong"), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    error(server.get("/v1/nothing"), 404, code="unknown_url")
    error(server.get("/v1/models/other"), 404, "model")
    error(server.get("/v1/chat/completions"), 405)
    error(server.post("/v1/chat/completions", {**chat, "pad": "x" * MAX_BODY}), 413, code="request_too_large")

    # a failure inside the model: a 500 for a whole response, an error event for a stream; the server goes on
    feed = server.engine.session.feed
    monkeypatch.setattr(server.engine.session, "feed", lambda ids, *a: feed(ids, *a) if len(ids) > 1 else 1 / 0)
    error(server.post("/v1/completions", {"prompt": "The", "max_tokens": 8}), 500)
    r = server.post("/v1/completions", {"prompt": "The", "max_tokens": 8, "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
    monkeypatch.undo()

    # a full queue: the worker held on a gate, one request waiting, the next refused with Retry-After; then the
    # waiting client gives up (a 1 s timeout) and its request leaves the queue
    gate, process = threading.Event(), server.engine._process
    monkeypatch.setattr(server.engine, "_process", lambda job: (gate.wait(30), process(job)))
    monkeypatch.setattr(server.engine, "max_queue", 1)
    cancelled = server.stats()["requests"]["cancelled"]

    def impatient() -> None:
        with pytest.raises(httpx.ReadTimeout):
            server.post("/v1/chat/completions", {**chat, "stream": True}, timeout=1)

    running = threading.Thread(target=server.post, args=("/v1/chat/completions", chat))
    running.start()
    until(server.engine.busy, "the first request did not start")
    waiting = threading.Thread(target=impatient)
    waiting.start()
    until(server.engine.queue_length, "the second request did not queue")
    r = server.post("/v1/chat/completions", chat)
    error(r, 503, code="queue_full")
    assert int(r.headers["retry-after"]) >= 1
    waiting.join(10)
    until(lambda: not server.engine.queue_length(), "the abandoned request stayed in the queue")
    assert server.stats()["requests"]["cancelled"] == cancelled + 1
    gate.set()
    running.join(30)
    monkeypatch.undo()
    assert server.get("/health").status_code == 200  # alive after all of it


def test_prefix_cache_lru_within_its_budget():
    def rows(tokens: list[int]) -> torch.Tensor:  # [2 layers, n, 4]: each row holds its token id
        return torch.tensor(tokens, dtype=torch.float32)[None, :, None].expand(2, -1, 4)

    cache = PrefixCache(max_bytes=10 * 64, block_tokens=2)  # a block: 2 layers × 2 tokens × 4 floats = 64 bytes
    assert cache.store([1, 2, 3, 4, 5], rows([1, 2, 3, 4, 5])) and cache.store([7, 8, 9, 10, 11], rows([7] * 5))
    assert cache.nbytes == 6 * 64 and cache.match([1, 2, 3, 9])[1] == 3 and cache.match([5])[0] is None
    assert cache.store([1, 2, 3, 4, 5, 6], rows([1, 2, 3, 4, 5, 6]))  # extends the first: replaces it
    assert len(cache) == 2 and not cache.store([1, 2, 3], rows([1, 2, 3]))  # held inside a longer one
    session = SimpleNamespace(cache=SimpleNamespace(data=torch.zeros(2, 16, 4)), tokens=[])
    cache.restore(cache.match([1, 2, 3, 4, 5, 9])[0], session, 5)
    assert session.tokens == [1, 2, 3, 4, 5] and session.cache.data[1, :6, 0].tolist() == [1, 2, 3, 4, 5, 0]
    cache.restore(cache.match([7, 8, 9])[0], session, 3)  # now the most recently used
    assert cache.store(list(range(20, 30)), rows(list(range(20, 30))))  # 5 blocks: the least recently used goes
    assert cache.match([1, 2, 3])[0] is None and cache.match([7, 8, 9])[1] == 3
    assert cache.nbytes == 8 * 64 <= cache.max_bytes and cache.stats()["evicted"] == 1
    assert not cache.store(list(range(100)), rows(list(range(100))))  # larger than the whole pool
    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2 and common_prefix([], [1]) == 0


def test_stop_text_holds_back_a_possible_stop():
    s = StopText(["END", "\n\n"])
    assert s.add("Hello E") == ("Hello ", False)
    assert s.add("N") == ("", False)
    assert s.add("Dgame") == ("", True)
    s = StopText(["END"])
    assert s.add("AEN") == ("A", False) and s.add("x") == ("ENx", False) and s.flush() == ""


def test_bind_warning_and_flags():
    from cli.cmd_serve import bind, bind_warning, cache_bytes
    from lite.errors import LiteError

    assert bind_warning("127.0.0.1", None) is None and bind_warning("::1", None) is None
    assert "--api-key" in bind_warning("0.0.0.0", None) and bind_warning("0.0.0.0", "k") is None
    assert cache_bytes("0") == 0 and cache_bytes("1MiB") == 1 << 20
    sock = bind("127.0.0.1", 0)  # a TCP socket proper: asyncio sets TCP_NODELAY on its connections (no 40 ms stalls)
    assert sock.proto == socket.IPPROTO_TCP
    with pytest.raises(LiteError, match="choose another --port"):
        bind("127.0.0.1", sock.getsockname()[1])
    sock.close()


def test_sigterm_shuts_down_cleanly():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", "0", "-t", "1", "-n", "8"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), (line, proc.stderr.read() if not line else "")
        url = line.split()[2].removesuffix("/v1")
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "The", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
