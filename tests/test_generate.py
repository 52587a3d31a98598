"""The one generation loop (`lite.generate.stream_generate`): its records against full forwards from scratch,
each finish reason, prefix reuse, stopping between prefill chunks, the one set of end ids, and the GGUF's
recommended sampling values through the Python API."""

from __future__ import annotations

import pytest
import torch
from fake_chat_model import FakeModel

import lite
from lite.chat import Chat
from lite.generate import end_ids, stream_generate
from lite.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from cli_models import tiny_chat_model

    path, _ = tiny_chat_model(tmp_path_factory.mktemp("gen_models"))
    return lite.load(str(path), device="cpu")


@pytest.fixture
def no_eos(real):
    eos = real.eos_token_id
    real.eos_token_id = None
    yield real
    real.eos_token_id = eos


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each from a full causal forward over everything so far (no cache re-use)."""
    ids: list[int] = []
    for _ in range(n):
        ids.append(int(torch.argmax(model.logits(prompt + ids)[-1])))
    return ids


def prompt_of(model, text: str = "Once upon a time") -> list[int]:
    return model.tokenizer.encode(text, add_bos=True)


def test_records_against_full_forwards(no_eos):
    model = no_eos
    prompt = prompt_of(model)
    ref = greedy_reference(model, prompt, 6)
    records = list(stream_generate(model, prompt, GREEDY, max_tokens=6))
    assert [r.token for r in records] == ref
    assert [r.finish_reason for r in records] == [None] * 5 + ["length"]
    assert [r.generation_tokens for r in records] == list(range(1, 7))
    assert "".join(r.text for r in records) == model.tokenizer.decode(ref)
    last = records[-1]
    assert (last.prompt_tokens, last.prompt_len, last.ctx_used) == (len(prompt), len(prompt), len(prompt) + 5)
    assert last.ttft >= last.prompt_seconds > 0 and last.peak_rss > 0
    assert list(model.generate(prompt, max_tokens=6, temperature=0.0)) == ref


def test_stop_ids_end_the_reply_without_their_token(no_eos):
    model = no_eos
    prompt = prompt_of(model)
    ref = greedy_reference(model, prompt, 3)
    records = list(stream_generate(model, prompt, GREEDY, max_tokens=6, stop=[ref[2]]))
    assert [r.token for r in records] == ref and records[-1].finish_reason == "stop"
    assert "".join(r.text for r in records) == model.tokenizer.decode(ref[:2])  # the stop token is not in the text
    assert list(model.generate(prompt, max_tokens=6, temperature=0.0, stop=[ref[2]])) == ref[:2]
    model.eos_token_id = ref[2]  # the model's own end token: the same
    assert end_ids(model) == {ref[2]}
    assert list(model.generate(prompt, max_tokens=6, temperature=0.0)) == ref[:2]
    bench_like = list(stream_generate(model, prompt, GREEDY, max_tokens=4, ignore_eos=True))
    assert [r.token for r in bench_like][:3] == ref and bench_like[-1].finish_reason == "length"


def test_context_full_and_prefix_reuse(no_eos):
    model = no_eos
    prompt = prompt_of(model)
    ref = greedy_reference(model, prompt, 4)
    session = model.session(len(prompt) + 3)
    records = list(stream_generate(model, prompt, GREEDY, max_tokens=10, session=session))
    assert [r.token for r in records] == ref and records[-1].finish_reason == "context"
    assert session.tokens == prompt + ref[:3]
    # the same prompt again: only its last token is fed (for its logits), the rest comes from the session
    again = list(stream_generate(model, prompt, GREEDY, max_tokens=2, session=session))
    assert again[-1].prompt_tokens == 1 and [r.token for r in again] == ref[:2]


def test_should_stop_between_tokens(no_eos):
    model = no_eos
    prompt = prompt_of(model)
    ref = greedy_reference(model, prompt, 2)
    records = []
    for r in stream_generate(model, prompt, GREEDY, max_tokens=10, should_stop=lambda: len(records) >= 2):
        records.append(r)
    assert [r.token for r in records] == ref + [None]
    assert records[-1].finish_reason == "interrupted" and records[-1].generation_tokens == 2


def test_should_stop_between_prefill_chunks_keeps_what_was_fed(no_eos, monkeypatch):
    import lite.generate

    model = no_eos
    monkeypatch.setattr(lite.generate, "PREFILL_CHUNK", 3)
    monkeypatch.setattr(lite.generate, "MAX_PREFILL_CHUNK", 3)
    prompt = prompt_of(model, "The experts of the mixture agree")
    assert len(prompt) > 6
    asked = []

    def second_time() -> bool:  # asked before each chunk: stop before the second one
        asked.append(1)
        return len(asked) == 2

    session = model.session(64)
    records = list(stream_generate(model, prompt, GREEDY, max_tokens=3, session=session, should_stop=second_time))
    assert [(r.token, r.finish_reason, r.prompt_tokens) for r in records] == [(None, "interrupted", 3)]
    assert session.tokens == prompt[:3]
    records = list(stream_generate(model, prompt, GREEDY, max_tokens=3, session=session))
    assert records[-1].prompt_tokens == len(prompt) - 3  # the fed chunk is re-used
    assert [r.token for r in records] == greedy_reference(model, prompt, 3)


def test_chat_stopped_during_a_chunked_prefill_keeps_the_conversation(real, monkeypatch):
    import lite.generate

    monkeypatch.setattr(lite.generate, "PREFILL_CHUNK", 4)
    monkeypatch.setattr(lite.generate, "MAX_PREFILL_CHUNK", 4)
    chat = Chat(real, params=GREEDY, max_tokens=3)
    forward = real.transformer.forward

    def forward_then_ctrl_c(*args, **kwargs):  # Ctrl+C arrives while the first chunk runs
        chat.stop()
        return forward(*args, **kwargs)

    monkeypatch.setattr(real.transformer, "forward", forward_then_ctrl_c)
    assert "".join(chat.send("Tell me about the experts")) == ""
    assert chat.last.finish == "interrupted" and chat.messages == [] and len(chat.session.tokens) == 4
    monkeypatch.setattr(real.transformer, "forward", forward)
    "".join(chat.send("Tell me about the experts"))
    prompt = real.tokenizer.apply_chat_template(chat.messages[:1])
    assert chat.last.prompt_tokens == len(prompt) - 4 and chat.messages[-1]["role"] == "assistant"


def test_end_ids_come_from_one_place(real):
    assert end_ids(real) == {real.tokenizer.eos_id}  # lite.load: the GGUF's eos id
    assert end_ids(FakeModel()) == {FakeModel().tokenizer.eos_id}  # a model without eos_token_id: its tokenizer's

    class WithTurnEnd:
        eos_token_id = 1
        metadata = {"tokenizer.ggml.eot_token_id": 7}

    assert end_ids(WithTurnEnd()) == {1, 7}


def test_cache_counts_per_record():
    model = FakeModel("abc")
    session = model.session()
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "q"}])
    records = list(stream_generate(model, prompt, GREEDY, max_tokens=10, session=session))
    # FakeModel counts 3 hits and 1 miss per feed: the prompt, then one feed per token but the last
    assert [(r.cache_hits, r.cache_misses) for r in records] == [(3 * (i + 1), i + 1) for i in range(len(records))]
    assert records[-1].finish_reason == "stop" and records[-1].token == model.tokenizer.eos_id


def test_gguf_sampling_defaults_reach_the_python_api(tmp_path):
    from cli_models import tiny_chat_model
    from retype_gguf import retype

    path, _ = tiny_chat_model(tmp_path)
    md = {"general.sampling.temp": 0.25, "general.sampling.top_k": 7, "general.sampling.penalty_last_n": 16}
    out = retype(path, tmp_path / "with_sampling.gguf", lambda ref: None, extra=md)
    model = lite.load(str(out), device="cpu")
    chat = Chat(model)
    assert (chat.params.temperature, chat.params.top_k, chat.params.repeat_last_n) == (0.25, 7, 16)
    assert chat.params.top_p == SamplingParams().top_p  # not in the file: lite's default
    explicit = SamplingParams.from_metadata(model.metadata, temperature=0.9, top_k=None)  # None: not given
    assert (explicit.temperature, explicit.top_k) == (0.9, 7)
    # Model.generate: the file's values unless the call names them
    model.eos_token_id = None
    prompt = prompt_of(model)
    file_params = SamplingParams(temperature=0.25, top_k=7, repeat_last_n=16, seed=3)
    expected = [r.token for r in stream_generate(model, prompt, file_params, max_tokens=8)]
    assert list(model.generate(prompt, max_tokens=8, seed=3)) == expected
    ignoring_the_file = [r.token for r in stream_generate(model, prompt, SamplingParams(seed=3), max_tokens=8)]
    assert ignoring_the_file != expected  # so the comparison above can fail
    lite_default = [r.token for r in stream_generate(model, prompt, SamplingParams(top_k=7, seed=3), max_tokens=8)]
    assert list(model.generate(prompt, max_tokens=8, seed=3, temperature=0.7)) == lite_default
    with pytest.raises(lite.LiteError, match="the model's general.sampling.top_p must be"):
        SamplingParams.from_metadata({"general.sampling.top_p": 2.0})
