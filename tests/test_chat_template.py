"""Chat templates: DeepSeek-V2's rendering, the built-in fallback, BOS exactly once, HF as the reference."""

from __future__ import annotations

import pytest
from hf_helpers import tokenizer_from_hf
from tiny_tokenizer import BOS, EOS, write_tiny_tokenizer

from lite.chat_template import DEEPSEEK_V2_CHAT_TEMPLATE, render_chat_template
from lite.convert.tokenizer_meta import tokenizer_metadata_from_hf
from lite.errors import LiteError
from lite.tokenizer import Tokenizer

SYSTEM_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
MULTI_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? 混合 🚀"},
    {"role": "assistant", "content": "6."},
    {"role": "user", "content": "Thanks!\n\tbye"},
]
CONVERSATIONS = [SYSTEM_USER, MULTI_TURN, [{"role": "user", "content": ""}], SYSTEM_USER + MULTI_TURN[1:3]]


def deepseek_v2_by_hand(messages, add_generation_prompt: bool) -> str:
    """The issue's rules, written out: the built-in template must render exactly this."""
    out = BOS
    for m in messages:
        if m["role"] == "system":
            out += m["content"] + "\n\n"
        elif m["role"] == "user":
            out += "User: " + m["content"] + "\n\n"
        else:
            out += "Assistant: " + m["content"] + EOS
    return out + ("Assistant:" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_chat_tok")
    write_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return tokenizer_from_hf(tiny_dir)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_render_matches_rules(messages, gen):
    for template in (DEEPSEEK_V2_CHAT_TEMPLATE, None):  # None: the built-in fallback
        text = render_chat_template(messages, template, bos_token=BOS, eos_token=EOS, add_generation_prompt=gen)
        assert text == deepseek_v2_by_hand(messages, gen)


def test_system_user_and_generation_prompt(tok):
    text = tok.render_chat(SYSTEM_USER)
    assert text == f"{BOS}You are terse.\n\nUser: Hi there\n\nAssistant:"  # no trailing space
    assert not tok.render_chat(SYSTEM_USER, add_generation_prompt=False).endswith("Assistant:")


def test_multi_turn_ids(tok):
    ids = tok.apply_chat_template(MULTI_TURN)
    expected = [tok.bos_id]
    expected += tok.encode("User: What is 2+2?\n\nAssistant: 4.", add_bos=False) + [tok.eos_id]
    expected += tok.encode("User: And 3+3? 混合 🚀\n\nAssistant: 6.", add_bos=False) + [tok.eos_id]
    expected += tok.encode("User: Thanks!\n\tbye\n\nAssistant:", add_bos=False)
    assert ids == expected


def test_bos_exactly_once(tok, tiny_dir):
    # the template writes BOS and add_bos_token is true: still one BOS
    ids = tok.apply_chat_template(SYSTEM_USER)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    # a template without BOS: add_bos_token supplies it
    no_bos = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok2 = Tokenizer.from_metadata({**tokenizer_metadata_from_hf(tiny_dir), "tokenizer.chat_template": no_bos})
    ids = tok2.apply_chat_template(SYSTEM_USER)
    assert ids[0] == tok2.bos_id and ids.count(tok2.bos_id) == 1
    # add_bos_token false and no BOS in the template: none
    md = {**tokenizer_metadata_from_hf(tiny_dir), "tokenizer.chat_template": no_bos}
    md["tokenizer.ggml.add_bos_token"] = False
    assert Tokenizer.from_metadata(md).apply_chat_template(SYSTEM_USER).count(tok.bos_id) == 0


def test_fallback_when_file_has_no_template(tiny_dir):
    md = tokenizer_metadata_from_hf(tiny_dir)
    del md["tokenizer.chat_template"]
    bare = Tokenizer.from_metadata(md)
    assert bare.chat_template is None
    assert bare.render_chat(MULTI_TURN) == deepseek_v2_by_hand(MULTI_TURN, True)
    assert bare.apply_chat_template(MULTI_TURN) == Tokenizer.from_metadata(
        tokenizer_metadata_from_hf(tiny_dir)
    ).apply_chat_template(MULTI_TURN)


def test_matches_transformers(tiny_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.render_chat(messages, add_generation_prompt=gen) == text
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == list(ids)


def test_template_errors_are_lite_errors():
    with pytest.raises(LiteError, match="roles must alternate"):
        render_chat_template(SYSTEM_USER, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(LiteError, match="does not parse"):
        render_chat_template(SYSTEM_USER, "{% for m in messages %}")
    with pytest.raises(LiteError):  # the sandbox refuses attribute games
        render_chat_template(SYSTEM_USER, "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(LiteError, match="role"):
        render_chat_template([{"content": "no role"}])


def test_hf_template_features():
    t = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
    assert render_chat_template([{"role": "user", "content": "é"}, {"role": "user", "content": "x"}], t) == (
        '{"role": "user", "content": "é"}'
    )


def test_special_text_in_content_stays_text(tok, tiny_dir):
    """A user typing the EOS/BOS text gets plain-text tokens; only the template's own specials are special."""
    typed = [{"role": "user", "content": f"say {EOS} then {BOS}!"}, {"role": "assistant", "content": f"ok{EOS}"}]
    ids = tok.apply_chat_template(typed)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids.count(tok.eos_id) == 1  # the one closing the assistant turn
    assert tok.decode(ids, special=True) == tok.render_chat(typed)
    expected = [tok.bos_id] + tok.encode(f"User: say {EOS} then {BOS}!\n\nAssistant: ok{EOS}", add_bos=False)
    expected += [tok.eos_id] + tok.encode("Assistant:", add_bos=False)
    assert ids == expected
    # a template that transforms the content still sees it, and still gets only its own specials
    trim = "{{ bos_token }}{% for m in messages %}{{ m['content'] | trim | upper }}{{ eos_token }}{% endfor %}"
    md = {**tokenizer_metadata_from_hf(tiny_dir), "tokenizer.chat_template": trim}
    t2 = Tokenizer.from_metadata(md)
    ids = t2.apply_chat_template([{"role": "user", "content": f"  a{EOS}b  "}], add_generation_prompt=False)
    assert ids == [t2.bos_id] + t2.encode(f"A{EOS}B", add_bos=False) + [t2.eos_id]
