"""A tiny stand-in honouring the Model/Session/Tokenizer contracts, for fast chat-logic tests."""

from __future__ import annotations

import torch

from lite.errors import LiteError
from lite.generate import Stopped

VOCAB = 260  # ids 0..255 are bytes, 256 = BOS, 257 = EOS
BOS, EOS = 256, 257


class FakeStream:
    def __init__(self):
        self.buf = b""

    def add(self, tok: int) -> str:
        self.buf += bytes([tok]) if tok < 256 else b""
        try:
            out, self.buf = self.buf.decode("utf-8"), b""
            return out
        except UnicodeDecodeError:
            return ""

    def flush(self) -> str:
        out, self.buf = self.buf.decode("utf-8", errors="replace"), b""
        return out


class FakeTokenizer:
    eos_id = EOS
    bos_id = BOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True) -> list[int]:
        ids = [BOS]
        for m in messages:
            if m["role"] == "system":
                ids += self.encode(m["content"] + "\n\n")
            elif m["role"] == "user":
                ids += self.encode("User: " + m["content"] + "\n\n")
            else:
                ids += self.encode("Assistant: " + m["content"]) + [EOS]
        if add_generation_prompt:
            ids += self.encode("Assistant:")
        return ids

    def stream(self) -> FakeStream:
        return FakeStream()


class FakeSession:
    def __init__(self, model, ctx):
        self.model, self.ctx, self.tokens = model, ctx, []

    def feed(self, ids, all_logits=False, should_stop=None):
        if should_stop is not None and should_stop():  # as a real session does between its prefill chunks
            raise Stopped
        if len(self.tokens) + len(ids) > self.ctx:
            raise LiteError("past ctx")
        self.model.fed.append(list(ids))
        self.tokens += list(ids)
        rows = torch.stack(
            [self.model.next_logits(self.tokens[: i + 1]) for i in range(len(self.tokens) - len(ids), len(self.tokens))]
        )
        return rows if all_logits else rows[-1]

    def rewind(self, n):
        self.tokens = self.tokens[:n]

    def reset(self):
        self.tokens = []


class FakeModel:
    """Replies " " + reply (bytes) + EOS after "Assistant:", whatever the question (greedy)."""

    def __init__(self, reply: str = "hi there", ctx: int = 4096):
        self.tokenizer = FakeTokenizer()
        self.reply = list((" " + reply).encode("utf-8")) + [EOS]
        self.default_ctx = ctx
        self.fed: list[list[int]] = []

    def session(self, ctx=None):
        return FakeSession(self, ctx or self.default_ctx)

    def stats(self):
        return {"total": {"hits": 3 * len(self.fed), "misses": len(self.fed)}}

    def next_logits(self, tokens):
        # position inside the current answer: count tokens since the last "Assistant:"
        marker = list(b"Assistant:")
        k = 0
        for j in range(len(tokens) - len(marker), -1, -1):
            if tokens[j : j + len(marker)] == marker:
                k = len(tokens) - j - len(marker)
                break
        logits = torch.zeros(VOCAB)
        logits[self.reply[min(k, len(self.reply) - 1)]] = 10.0
        return logits
