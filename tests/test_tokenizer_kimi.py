"""Kimi-K2's tokenizer (`tokenizer.ggml.pre` "kimi-k2") and chat format against llama.cpp itself.

llama.cpp splits "kimi-k2" text with a hand-written splitter rather than a regex, so lite's regex is checked against
llama.cpp's ids in two ways: on the real DeepSeek LLM vocabulary of ../shared relabelled "kimi-k2" (real merges, but
they rarely cross a split, so they show few of the rules), and on a vocabulary trained on the test texts themselves
with no pre-tokenizer, whose merges cross every boundary, so that any split lite makes and llama.cpp does not (or
the reverse) changes the ids. Texts are fixed ones for each rule plus fresh random ones each run.
"""

from __future__ import annotations

import ctypes
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf.vocab import bytes_to_unicode
from tokenizers import AddedToken, models, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.pre_tokenizers import ByteLevel

from lite.chat_template import KIMI_K2_CHAT_TEMPLATE, render_chat_template
from lite.pretokenizers import pre_tokenizer
from lite.tokenizer import Tokenizer
from quant.gguf_file import GGUFFile

TEXTS = [
    "我爱Python编程，用中文写代码。中文English混合mixed文本123个字符",
    "日本語のテキスト、カタカナとひらがな。人々は〇〇〇〇年に⺀⺁を見た々",
    "한국어 텍스트 안녕하세요! नमस्ते दुनिया स्वागत है। สวัสดีครับ ภาษาไทย",
    "DON'T I'M WE'LL YOU'RE THEY'VE HE'D IT'S don't we're i've she'll it'd 'twas 's rock'n'roll O'Neil",
    "getUserName iPhone helloWorld HTTPServer XMLHttpRequest snake_case kebab-case",
    "1 12 123 1234 12345 123456 1234567 12345678901234567890 3.14159 -2e10 ٣٤٥٦ ½¼ ⅫⅣ 1st 2nd",
    'Hello!!! What??? ...and,,, ;;;---\n (a) [b] {c} <d> #tag @user $5 100% a.b.c x+=1; `code` "quoted"',
    "a  b   c\t\td \n\n\n  e\r\n  \u00a0 x   \n \n\t\n y\u3000\u3000z\u2009\u2009w  ",
    "🙂🎉👍🏽👨\u200d👩\u200d👧 ok😀 ❤️ ⭐️ ✓✗ →← ∑∞≠ ©®™",
    "Ünïcödé café naïve résumé façade Ångström e\u0301te\u0301 Ελληνικά Русский текст ĳ ß ﬁ",
]
# the awkward characters: Han by llama.cpp's blocks and its edges, Han-script non-Han (々 〇 ⺀), marks, numbers that
# are not digits, cased and uncased letters, every kind of whitespace, controls, unassigned and private code points
ALPHABET = [
    *"aZ'sStTmMdDrReEvVlL \t\r\n\u00a0\u2009\u3000\u0085\u000b\u000c\u2028.,!?#-_/19",
    *"中漢\u3007\u3005\u2e80\uf900\U00020000\U0002a6e0\u4dbf\u9fff\u3400é\u0301\u0903ΩßあカŉǅʰⅫ\u0660𝟘İKſ",
    *"한٣½🙂\u200d\ufe0f$“…\x1c\x1f\x00\U000e0001\ud7ff\U0010ffff\u0378\ufffd\ue000",
]


def write_gguf(
    out: Path, metadata: dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]], tensors=()
) -> Path:
    """A GGUF file of `metadata` {key: (value, type, array item type)} and (name, float32 array) tensors."""
    w = gguf.GGUFWriter(str(out), metadata["general.architecture"][0])
    for key, (value, vtype, sub) in metadata.items():
        if key != "general.architecture":
            w.add_key_value(key, value, vtype, sub_type=sub)
    for name, array in tensors:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def gguf_metadata(f: GGUFFile) -> dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    fields = {k: v for k, v in f.reader.fields.items() if not k.startswith("GGUF.")}
    return {k: (f.metadata[k], v.types[0], v.types[-1] if len(v.types) > 1 else None) for k, v in fields.items()}


def tokenizer_metadata(tokens: list[str], types: list[int], merges: list[str], pre: str = "kimi-k2", **ids: int):
    """GGUF `tokenizer.*` metadata of a gpt2-model vocabulary; `ids` as bos=, eos= (token ids)."""
    T = gguf.GGUFValueType
    md = {
        "tokenizer.ggml.model": ("gpt2", T.STRING, None),
        "tokenizer.ggml.pre": (pre, T.STRING, None),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.merges": (merges, T.ARRAY, T.STRING),
    }
    for name, tid in ids.items():
        md[f"tokenizer.ggml.{name}_token_id"] = (tid, T.UINT32, None)
    return md


def trained_bpe(texts: Sequence[str], size: int, specials: Sequence[str] = (), pre: str | None = None):
    """(tokens, token types, merges) of a byte-level BPE trained on `texts`; `pre` None: each text is one word,
    so merges cross every place a pre-tokenizer could cut."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizer(pre) if pre else ByteLevel(add_prefix_space=False, use_regex=False)
    added = [AddedToken(t, normalized=False, special=True) for t in specials]
    trainer = trainers.BpeTrainer(
        vocab_size=size, min_frequency=1, special_tokens=added, initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    hf.train_from_iterator(texts, trainer)
    model = json.loads(hf.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    return tokens, [int(k) for k in types], merges


def vocab_only(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference tokenizer here")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def assert_same_ids(ref, ours: Tokenizer, texts: Sequence[str]) -> None:
    for text in texts:
        want = ref.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        got = ours.encode(text, add_bos=False)
        assert got == want, (text[:60], got[:20], want[:20])
        assert ours.decode(got) == text


def random_texts(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 40))) for _ in range(n)]


# ---- the pre-tokenizer ----


def test_kimi_k2_matches_llama_cpp_on_the_deepseek_vocabulary(shared_dir, tmp_path):
    src = GGUFFile(shared_dir / "vocab" / "ggml-vocab-deepseek-llm.gguf")
    md = gguf_metadata(src)
    md["tokenizer.ggml.pre"] = ("kimi-k2", *md["tokenizer.ggml.pre"][1:])
    path = write_gguf(tmp_path / "vocab-kimi-k2.gguf", md)
    ref, ours = vocab_only(path), Tokenizer.from_gguf(path)
    assert ours.pre == "kimi-k2"
    corpus = (shared_dir / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    rng = random.Random()
    start = rng.randrange(len(corpus) - 5000)
    assert_same_ids(ref, ours, [*TEXTS, corpus[start : start + 5000], *random_texts(rng, 200)])


def test_kimi_k2_splits_where_llama_cpp_does(tmp_path):
    """On a vocabulary whose merges cross every boundary the ids show each split: lite's regex must cut exactly
    where llama.cpp's kimi-k2 splitter does, on every rule's texts and on random strings of awkward characters."""
    texts = [*TEXTS, *random_texts(random.Random(), 300)]
    tokens, types, merges = trained_bpe(texts, 30000)
    md = {"general.architecture": ("deepseek2", gguf.GGUFValueType.STRING, None)}
    path = write_gguf(tmp_path / "crossing.gguf", {**md, **tokenizer_metadata(tokens, types, merges)})
    ref = vocab_only(path)
    assert_same_ids(ref, Tokenizer.from_gguf(path), texts)
    # the test can fail: deepseek-v3's rules (a different Han set, marks as letters) give other ids here
    v3 = Tokenizer(tokens, types, merges, pre="deepseek-v3")
    assert any(v3.encode(t, add_bos=False) != ref.tokenize(t.encode(), add_bos=False, special=False) for t in TEXTS)


_BYTES = {c: b for b, c in bytes_to_unicode().items()}


def test_kimi_k2_pieces():
    """What llama.cpp's splitter does (the two tests above check it): Han by its code-point blocks, any non-Han
    letters as one word with a contraction in either case, digits in threes, a mark or space leading a word."""

    def pieces(text: str) -> list[str]:
        return [bytes(_BYTES[c] for c in p).decode() for p, _ in pre_tokenizer("kimi-k2").pre_tokenize_str(text)]

    assert pieces("getUserName DON'T we'Ll 人々〇〇〇〇年") == [
        "getUserName", " DON'T", " we'Ll", " ", "人", "々", "〇〇〇", "〇", "年"
    ]  # fmt: skip
    assert pieces("中文abc e\u0301t 12345  \n\n x!!\n\n") == [
        "中文", "abc", " e", "\u0301t", " ", "123", "45", "  \n\n", " x", "!!\n\n"
    ]  # fmt: skip


# ---- the chat format ----

CONVERSATIONS = [
    [{"role": "user", "content": "Hi 你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?\nAnswer:"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1 <|im_end|> typed"},
        {"role": "tool", "content": '{"x": 42}'},
        {"role": "observer", "content": "unknown role"},
        {"role": "user", "content": "Q2"},
    ],
]


def llama_cpp_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """llama.cpp's `llama_chat_apply_template` (its built-in templates, chosen by name or detected in the text)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python holds llama.cpp's chat templates")
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *(llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages)
    )
    tmpl = template.encode()
    n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(messages), add_generation_prompt, None, 0)
    assert n > 0, template
    buf = ctypes.create_string_buffer(n + 1)
    assert llama_cpp.llama_chat_apply_template(tmpl, chat, len(messages), add_generation_prompt, buf, n + 1) == n
    return buf.raw[:n].decode("utf-8")


def test_kimi_k2_template_is_llama_cpps():
    literal = (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>2+2?\nAnswer:<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    assert render_chat_template(CONVERSATIONS[1], KIMI_K2_CHAT_TEMPLATE) == literal
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = render_chat_template(messages, KIMI_K2_CHAT_TEMPLATE, add_generation_prompt=gen)
            assert ours == llama_cpp_chat("kimi-k2", messages, gen)
            # and llama.cpp recognises lite's template text as Kimi-K2's, were it written into a GGUF
            assert ours == llama_cpp_chat(KIMI_K2_CHAT_TEMPLATE, messages, gen)


KIMI_SPECIALS = ["<|im_end|>", "[BOS]", "[EOS]", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"]


def kimi_like_tokenizer_metadata(size: int, template: str | None = None) -> dict:
    """A small Kimi-K2-like vocabulary of `size` tokens: BPE trained with the kimi-k2 splits, Kimi's role tokens
    as CONTROL ("<|im_end|>" is id 0), EOS "[EOS]", no BOS added, padded with UNUSED "[PADn]" tokens as
    llama.cpp's converter pads Kimi's vocabulary."""
    from tiny_tokenizer import TRAINING_TEXT

    tokens, types, merges = trained_bpe([TRAINING_TEXT] * 4, size, KIMI_SPECIALS, pre="kimi-k2")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), size)]
    types += [int(gguf.TokenType.UNUSED)] * (size - len(types))
    md = tokenizer_metadata(tokens, types, merges, bos=tokens.index("[BOS]"), eos=tokens.index("[EOS]"))
    md["tokenizer.ggml.add_bos_token"] = (False, gguf.GGUFValueType.BOOL, None)
    if template is not None:
        md["tokenizer.chat_template"] = (template, gguf.GGUFValueType.STRING, None)
    return md


def test_a_kimi_k2_vocabulary_chats_in_kimi_k2s_format(tmp_path):
    md = {"general.architecture": ("deepseek2", gguf.GGUFValueType.STRING, None), **kimi_like_tokenizer_metadata(400)}
    path = write_gguf(tmp_path / "kimi-vocab.gguf", md)
    tok = Tokenizer.from_gguf(path)
    assert tok.chat_template is None  # the file has none: Kimi-K2's built-in one, chosen by the role tokens
    assert tok.eog_ids == {tok.eos_id, tok.tokens.index("<|im_end|>")} and tok.eos_token == "[EOS]"
    ref = vocab_only(path)
    for messages in CONVERSATIONS:
        text = llama_cpp_chat("kimi-k2", messages, True)
        assert tok.render_chat(messages) == text
        if not any("<|" in m["content"] for m in messages):  # llama.cpp would parse typed special text too
            assert tok.apply_chat_template(messages) == ref.tokenize(text.encode(), add_bos=True, special=True)
    # "<|im_end|>" typed in a message stays text; the template's own is one token
    ids = tok.apply_chat_template(CONVERSATIONS[2])
    assert ids.count(tok.tokens.index("<|im_end|>")) == len(CONVERSATIONS[2])


def test_generation_stops_at_an_end_of_turn_token():
    """A reply ends at any of the tokenizer's `eog_ids` (Kimi-K2's <|im_end|>), not only at EOS."""
    from fake_chat_model import BOS, EOS, FakeModel, FakeTokenizer

    from lite.chat import Chat
    from lite.generate import generate

    im_end = 258

    class EndOfTurnTokenizer(FakeTokenizer):
        eog_ids = frozenset({EOS, im_end})

    model = FakeModel("hi there")
    model.tokenizer = EndOfTurnTokenizer()
    model.reply[-1] = im_end  # " hi there" then <|im_end|>, then (were it not a stop) <|im_end|> forever
    chat = Chat(model, max_tokens=40)
    assert "".join(chat.send("hello")) == " hi there"
    assert chat.last is not None and chat.last.finish == "stop" and im_end not in chat.last.token_ids
    model.eos_token_id, model.max_context = EOS, 4096
    prompt = [BOS, *model.tokenizer.encode("Assistant:")]
    assert bytes(generate(model, prompt, max_tokens=40, temperature=0)) == b" hi there"


# ---- a tiny Kimi-K2-like model through the CLI ----


def tiny_kimi_gguf(root: Path, pre: str = "kimi-k2", head: Callable[[np.ndarray], np.ndarray] | None = None) -> Path:
    """tests/tiny_models.py's Kimi-K2-like model (sigmoid router, many experts, one dense layer) converted by lite,
    with a Kimi-K2-like vocabulary in place of the tiny DeepSeek one, labelled `pre`; `head` rewrites output.weight."""
    from cli_models import tiny_chat_model

    model, _ = tiny_chat_model(root, kind="kimi")
    f = GGUFFile(model)
    md = {k: v for k, v in gguf_metadata(f).items() if not k.startswith("tokenizer.")}
    md.update(kimi_like_tokenizer_metadata(len(f.metadata["tokenizer.ggml.tokens"])))
    md["tokenizer.ggml.pre"] = (pre, gguf.GGUFValueType.STRING, None)
    tensors = []
    for name, ref in f.tensors.items():
        array = np.array(ref.data).view(np.float32).reshape(ref.shape)
        tensors.append((name, head(array) if head and name == "output.weight" else array))
    return write_gguf(root / f"tiny-kimi-{pre}.gguf", md, tensors)


def test_tiny_kimi_k2_model_chats_and_stops_at_im_end(tmp_path, lite):
    # a head of zeros: every logit ties, so greedy decoding picks id 0, "<|im_end|>", at once
    path = tiny_kimi_gguf(tmp_path, head=np.zeros_like)
    args = ("run", str(path), "--json", "--chat", "--system", "Be short.", "-p", "你好 world", "-n", "5", "--temp", "0")
    rec = json.loads(lite(*args).stdout)
    literal = (
        "<|im_system|>system<|im_middle|>Be short.<|im_end|><|im_user|>user<|im_middle|>你好 world<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    assert rec["prompt_tokens"] == len(Tokenizer.from_gguf(path).encode(literal, parse_special=True))
    assert rec["finish"] == "stop" and rec["tokens"] == [] and rec["generated_tokens"] == 1 and rec["text"] == ""
    # a plain prompt ends there too: <|im_end|> ends generation (llama.cpp's EOG tokens), not only a chat turn
    rec = json.loads(lite("run", str(path), "--json", "-p", "你好 world", "-n", "5", "--temp", "0").stdout)
    assert rec["finish"] == "stop" and rec["tokens"] == []


def test_tiny_kimi_k2_model_generates(tmp_path, lite):
    path = tiny_kimi_gguf(tmp_path)
    rec = json.loads(lite("run", str(path), "--json", "--chat", "-p", "Hello", "-n", "4", "--temp", "0").stdout)
    tok = Tokenizer.from_gguf(path)
    assert rec["prompt_tokens"] == len(tok.apply_chat_template([{"role": "user", "content": "Hello"}]))
    assert rec["generated_tokens"] >= 1 and rec["text"] == tok.decode(rec["tokens"])


def test_an_unknown_pre_tokenizer_is_refused_in_one_line(tmp_path, lite):
    path = tiny_kimi_gguf(tmp_path, pre="kimi-k3")
    proc = lite("run", str(path), "-p", "x", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "'kimi-k3'" in proc.stderr and "tokenizer.ggml.pre" in proc.stderr and "'kimi-k2'" in proc.stderr
