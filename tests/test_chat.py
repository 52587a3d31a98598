"""lite.chat: the conversation logic, on a fake model (exact token accounting) and a real tiny model."""

from __future__ import annotations

import json

import pytest
from fake_chat_model import EOS, FakeModel

from lite.chat import Chat
from lite.errors import ContextTooSmall, LiteError
from lite.generate import common_prefix
from lite.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def reply(chat: Chat, text: str) -> str:
    return "".join(chat.send(text))


def test_reply_streams_and_is_recorded():
    model = FakeModel("hi there")
    chat = Chat(model, params=GREEDY)
    pieces = list(chat.send("hello"))
    assert "".join(pieces) == " hi there" and len(pieces) > 1
    assert chat.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    s = chat.last
    assert s.finish == "stop" and s.gen_tokens == len(" hi there") + 1  # + the end-of-sequence token
    assert s.prompt_tokens == len(model.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]))
    assert s.ctx_used == len(chat.session.tokens) and s.hit_rate == 0.75


def test_second_turn_prefills_only_new_tokens():
    model = FakeModel("hi there")
    chat = Chat(model, params=GREEDY, system="be brief")
    reply(chat, "one")
    held = list(chat.session.tokens)
    reply_before = len(chat.messages)
    model.fed.clear()
    reply(chat, "two")
    full = model.tokenizer.apply_chat_template(chat.messages[:reply_before] + [chat.messages[-2]])
    assert full[: len(held)] == held  # the cache already held the whole first exchange
    assert chat.last.prompt_tokens == len(full) - len(held)
    assert model.fed[0] == full[len(held) :]  # exactly the new tokens: EOS + "User: two\n\nAssistant:"
    assert model.fed[0][0] == EOS


def test_regen_rewinds_to_the_prompt():
    model = FakeModel("abc")
    chat = Chat(model, params=GREEDY)
    reply(chat, "q")
    n_prompt = len(model.tokenizer.apply_chat_template(chat.messages[:1]))
    model.fed.clear()
    again = "".join(chat.regenerate())
    assert again == " abc" and len(chat.messages) == 2
    assert chat.last.prompt_tokens == 1 and model.fed[0] == [ord(":")]  # only the last prompt token, for logits
    assert len(chat.session.tokens) == n_prompt + len(" abc")


def test_regen_with_nothing_said():
    with pytest.raises(LiteError, match="nothing to regenerate"):
        Chat(FakeModel(), params=GREEDY).regenerate()


def test_max_tokens_marks_the_cut():
    chat = Chat(FakeModel("a long answer"), params=GREEDY, max_tokens=4)
    assert reply(chat, "q") == " a l"
    assert chat.last.finish == "length"


def test_stop_keeps_the_partial_reply():
    chat = Chat(FakeModel("abcdef"), params=GREEDY)
    out = []
    for piece in chat.send("q"):
        out.append(piece)
        if len(out) == 3:
            chat.stop()
    assert "".join(out) == " ab" and chat.last.finish == "interrupted"
    assert chat.messages[-1] == {"role": "assistant", "content": "ab"}
    assert reply(chat, "next") == " abcdef"  # the conversation goes on


def test_context_overflow_drops_oldest_turns():
    chat = Chat(FakeModel("0123456789", ctx=120), params=GREEDY, system="sys", max_tokens=16)
    reply(chat, "first question")
    reply(chat, "second question")
    assert chat.last.dropped_turns == 0
    reply(chat, "third question")  # 6 + 2 x 44 + 32 prompt tokens + reserve 16 > 120
    s = chat.last
    assert s.dropped_turns >= 1 and any("dropped" in n for n in s.notes)
    assert chat.messages[0] == {"role": "system", "content": "sys"}
    assert all(m["content"] != "first question" for m in chat.messages)
    assert chat.messages[-1]["content"] == "0123456789" and s.ctx_used <= 120


def test_too_long_message_is_refused():
    chat = Chat(FakeModel(ctx=64), params=GREEDY)
    with pytest.raises(
        ContextTooSmall, match="the message needs 119 tokens plus 16 .* context holds 64; .*larger context$"
    ):
        reply(chat, "x" * 100)
    assert chat.messages == []


def test_reply_that_fills_the_context():
    chat = Chat(FakeModel("0123456789" * 7, ctx=80), params=GREEDY, max_tokens=1000)
    reply(chat, "q")
    assert chat.last.finish == "context" and len(chat.session.tokens) == 80


def test_utf8_reply_never_splits_characters():
    text = "héllo 世界 🙂 ok"
    pieces = list(Chat(FakeModel(text), params=GREEDY).send("q"))
    assert "".join(pieces) == " " + text
    assert all("\ufffd" not in p for p in pieces)


def test_save_load_roundtrip(tmp_path):
    chat = Chat(FakeModel("yes"), params=GREEDY, system="sys")
    reply(chat, "q1")
    path = tmp_path / "c.json"
    chat.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "lite-chat" and data["messages"] == chat.messages
    other = Chat(FakeModel("yes"), params=GREEDY)
    assert other.load(path) == 3 and other.messages == chat.messages
    reply(other, "q2")
    assert [m["role"] for m in other.messages] == ["system", "user", "assistant", "user", "assistant"]
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(LiteError, match="not JSON"):
        other.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"messages": [{"role": "robot", "content": "x"}]}')
    with pytest.raises(LiteError, match="no conversation"):
        other.load(tmp_path / "other.json")
    with pytest.raises(LiteError, match="cannot read"):
        other.load(tmp_path / "missing.json")


def test_set_and_clear():
    chat = Chat(FakeModel(), params=SamplingParams())
    chat.set("temp", "0.2")
    chat.set("top_k", "5")
    chat.set("max_tokens", "9")
    chat.set("seed", "3")
    assert chat.params.temperature == 0.2 and chat.params.top_k == 5 and chat.max_tokens == 9 and chat.seed == 3
    for name, value in [("top_p", "1.5"), ("top_k", "x"), ("bogus", "1"), ("max_tokens", "0")]:
        with pytest.raises(LiteError):
            chat.set(name, value)
    reply(chat, "q")
    chat.set_system("new system")
    chat.clear()
    assert chat.messages == [{"role": "system", "content": "new system"}] and chat.session.tokens == []


class FailingModel(FakeModel):
    """A FakeModel whose forward raises once its `fail_after` more calls have been made (None: never)."""

    fail_after: int | None = None

    def next_logits(self, tokens):
        if self.fail_after is not None:
            if self.fail_after == 0:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            self.fail_after -= 1
        return super().next_logits(tokens)


@pytest.mark.parametrize("fail_after", [0, 5])  # in the prefill, or mid-reply after a few pieces streamed
def test_a_failed_turn_leaves_the_conversation_as_it_was(fail_after):
    model = FailingModel("hello there friend")
    chat = Chat(model, params=GREEDY, system="sys")
    reply(chat, "first")
    before = [dict(m) for m in chat.messages]
    model.fail_after = fail_after
    with pytest.raises(RuntimeError, match="illegal memory access"):
        reply(chat, "second")
    assert chat.messages == before and chat.last.finish == "error"
    with pytest.raises(RuntimeError):  # /regen fails too: the last answer is kept, not dropped
        model.fail_after = 0
        "".join(chat.regenerate())
    assert chat.messages == before
    model.fail_after = None
    assert reply(chat, "second") == " hello there friend"  # the session goes on from the kept prefix
    assert chat.messages == before + [
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "hello there friend"},
    ]
    full = model.tokenizer.apply_chat_template(chat.messages[:-1])
    assert chat.session.tokens[: len(full)] == full  # the cache holds exactly this conversation


def test_a_refused_turn_keeps_the_older_turns():
    chat = Chat(FakeModel("ok", ctx=100), params=GREEDY, max_tokens=8)
    reply(chat, "one")
    reply(chat, "two")
    before = [dict(m) for m in chat.messages]
    with pytest.raises(LiteError, match="the message needs"):
        reply(chat, "x" * 120)  # would drop both older turns, then still not fit
    assert chat.messages == before


def test_stopped_regen_keeps_the_previous_answer():
    chat = Chat(FakeModel("abc"), params=GREEDY)
    reply(chat, "q")
    before = [dict(m) for m in chat.messages]
    original = chat.session.feed

    def feed_then_stop(ids, all_logits=False, should_stop=None):  # Ctrl+C during the prefill, before the first token
        chat.stop()
        return original(ids, all_logits)

    gen = chat.regenerate()

    chat.session.feed = feed_then_stop
    assert "".join(gen) == "" and chat.last.finish == "interrupted"
    assert chat.messages == before


def test_set_rejects_values_that_break_sampling_and_changes_nothing():
    chat = Chat(FakeModel(), params=SamplingParams())
    settings = chat.settings()
    for name, value, message in [
        ("temp", "inf", "temp must be a finite number >= 0 (0 = greedy), got 'inf'"),
        ("temp", "nan", "temp must be a finite number >= 0 (0 = greedy), got 'nan'"),
        ("repeat_penalty", "0", "repeat_penalty must be a finite number > 0 (1 = off), got '0'"),
        ("seed", str(2**64), f"seed must be a whole number from 0 to {2**64 - 1}, got '{2**64}'"),
        ("top_k", "1e3", "top_k must be a whole number >= 0 (0 = off), got '1e3'"),
    ]:
        with pytest.raises(LiteError) as e:
            chat.set(name, value)
        assert str(e.value) == message
    assert chat.settings() == settings
    chat.set("seed", str(2**64 - 1))
    assert chat.seed == 2**64 - 1
    chat.set("temp", "1e-300")
    assert reply(chat, "q") == " hi there"  # a tiny temperature is greedy in effect, and finite


def test_undecodable_input_is_replaced_and_noted():
    chat = Chat(FakeModel(), params=GREEDY)
    reply(chat, "Hello \udcff\udcfe")  # bytes 0xff 0xfe as a surrogateescape'd terminal delivers them
    assert chat.messages[0]["content"] == "Hello \ufffd\ufffd"
    assert chat.last.notes == ["the message was not valid UTF-8: 2 invalid bytes replaced with U+FFFD (\ufffd)"]


# -- on a real tiny converted model with a real tokenizer ----------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from cli_models import tiny_chat_model

    import lite

    path, _ = tiny_chat_model(tmp_path_factory.mktemp("chat_models"))
    return lite.load(str(path), device="cpu")


def test_real_multi_turn_reuses_the_cache(real):
    import torch

    chat = Chat(real, params=GREEDY, max_tokens=5, system="Be brief.")
    reply(chat, "Hello")
    held = list(chat.session.tokens)
    first_prompt = real.tokenizer.apply_chat_template(chat.messages[:2])
    reply(chat, "Tell me more")
    prompt = chat.session.tokens[: chat.last.prompt_len]
    keep = common_prefix(held, prompt)
    assert keep >= len(first_prompt)  # the first turn's prompt was never prefilled again
    assert chat.last.prompt_tokens == len(prompt) - keep
    assert real.tokenizer.decode(prompt, special=True) == real.tokenizer.render_chat(chat.messages[:-1])
    # the incrementally built cache gives the same greedy reply as full forwards from scratch
    ids: list[int] = []
    for _ in range(len(chat.last.token_ids)):
        ids.append(int(torch.argmax(real.logits(prompt + ids)[-1])))
    assert ids == chat.last.token_ids


def scripted(real, forced: list[int]):
    """The real model's tokenizer and session, with the logits forced to spell `forced` after each prompt."""
    import torch

    class Scripted:
        tokenizer = real.tokenizer
        step = 0

        def session(self, ctx=None):
            inner = real.session(ctx)
            outer = self

            class S:
                def __getattr__(self, name):
                    return getattr(inner, name)

                def feed(self, ids, all_logits=False, should_stop=None):
                    inner.feed(ids)
                    if len(ids) > 1 or ids[-1] not in forced:  # a prompt: start spelling from the top
                        outer.step = 0
                    logits = torch.zeros(real.tokenizer.vocab_size)
                    logits[forced[min(outer.step, len(forced) - 1)]] = 1.0
                    outer.step += 1
                    return logits

            return S()

        def stats(self):
            return {}

    return Scripted()


def byte_tokens(tok, text: str) -> list[int]:
    """`text` spelled with single-byte tokens (a non-canonical tokenization; splits multi-byte characters)."""
    byte_id: dict[int, int] = {}
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        if len(b) == 1:
            byte_id.setdefault(b[0], i)
    return [byte_id[b] for b in text.encode("utf-8")]


def test_real_reply_tokens_stay_in_the_cache(real):
    """The model's own (non-canonical) reply tokens are kept: the next turn prefills exactly its new text."""
    tok = real.tokenizer
    forced = byte_tokens(tok, " Hello there") + [tok.eos_id]
    chat = Chat(scripted(real, forced), params=GREEDY)
    assert reply(chat, "Hi") == " Hello there"
    held = list(chat.session.tokens)
    reply(chat, "More")
    new = tok.encode("<｜end▁of▁sentence｜>User: More\n\nAssistant:", add_bos=False, parse_special=True)
    assert chat.session.tokens[: len(held)] == held and chat.last.prompt_tokens == len(new)
    assert chat.session.tokens[len(held) : len(held) + len(new)] == new


def test_real_same_seed_same_conversation(real):
    def conversation(seed):
        chat = Chat(
            real, params=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed), max_tokens=6
        )
        return [reply(chat, "Hi"), reply(chat, "Again"), "".join(chat.regenerate())]

    assert conversation(3) == conversation(3)
    assert conversation(3) != conversation(4)


def test_real_utf8_split_across_byte_tokens(real):
    """A reply made of single-byte tokens that split multi-byte characters streams whole characters only."""
    tok = real.tokenizer
    text = "Café 混合专家 🚀"
    forced = byte_tokens(tok, text) + [tok.eos_id]
    assert len(forced) > len(text) + 1  # several tokens per character
    pieces = list(Chat(scripted(real, forced), params=GREEDY).send("q"))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) == len(text)
