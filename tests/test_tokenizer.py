"""The DeepSeek tokenizer: llama.cpp's vectors, an independent reference BPE, the GGUF writer, streaming decode."""

from __future__ import annotations

import json
import random

import gguf
import pytest
import regex
from hf_helpers import tokenizer_from_hf
from tiny_tokenizer import BOS, EOS, write_tiny_tokenizer
from tokenizers import Tokenizer as HFTokenizer

from lite.convert.tokenizer_meta import add_tokenizer_metadata, tokenizer_metadata_from_hf
from lite.errors import LiteError
from lite.tokenizer import DEEPSEEK_LLM_SPLITS, Tokenizer, deepseek_llm_pre_tokenizer

VOCAB = "vocab/ggml-vocab-deepseek-llm.gguf"

HARD_CASES = [
    "1234567890123456789 and 00000000000000000000007",
    "3.14159265358979 1,000,000 ١٢٣ ½ ²³",  # Arabic-Indic digits, vulgar fraction, superscripts
    "a     b          c" + " " * 40,
    "\t\tindented\n\n\n\r\nwindows\rold mac\n",
    " \n \t \n",
    "   ",
    "我想在apple工作1314151天～，然后回家。",
    "한국어 텍스트와 English 섞기",
    "日本語のテキスト、カタカナとひらがな。",
    "🚀🦙 emoji 😶‍🌫️ ✅ 👍🏽 🇩🇪",
    "Café naïve Äpfel Cửa Việt Ελληνικά Ὗώ ΐ Ω K нещо на Български",
    "mixed: Привет мир, مرحبا بالعالم, שלום עולם, नमस्ते दुनिया, สวัสดี",
    'def f(x: int) -> dict[str, int]:\n    return {"a": x ** 2}  # comment\n',
    "if (a && b || !c) { x[i] += y->z; } // c++ <tag attr='v'/>",
    f"typed specials: {BOS} {EOS} <｜begin▁of▁sentence｜>",
    "ø ö ú ÿ  [PAD100015] <|EOT|>",
    "fullwidth ＡＢＣ ａｂｃ！？ and quotes ‘x’ “y” 　。",
    "",
]


# ---- an independent reference: llama.cpp's split semantics (Python `regex`) and its rank-ordered BPE ----


def reference_split(text: str) -> list[str]:
    pieces = [text]
    for pattern in DEEPSEEK_LLM_SPLITS:
        out = []
        for p in pieces:
            last = 0
            for m in regex.finditer(pattern, p):
                if m.start() > last:
                    out.append(p[last : m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                last = m.end()
            if last < len(p):
                out.append(p[last:])
        pieces = out
    return pieces


class ReferenceBPE:
    """llama.cpp's BPE loop: merge the lowest-ranked adjacent pair (leftmost first) until none is left."""

    def __init__(self, tokens: list[str], merges: list[str]):
        from gguf.vocab import bytes_to_unicode

        self.b2u = bytes_to_unicode()
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.ids = {t: i for i, t in enumerate(tokens)}

    def encode(self, text: str) -> list[int]:
        out, none = [], 1 << 62
        for word in reference_split(text):
            syms = [self.b2u[b] for b in word.encode()]
            while len(syms) > 1:
                best = min(range(len(syms) - 1), key=lambda i: (self.ranks.get((syms[i], syms[i + 1]), none), i))
                if (syms[best], syms[best + 1]) not in self.ranks:
                    break
                syms[best : best + 2] = [syms[best] + syms[best + 1]]
            out += [self.ids[s] for s in syms]
        return out


# ---- fixtures ----


@pytest.fixture(scope="module")
def vocab_tok(shared_dir):
    return Tokenizer.from_gguf(shared_dir / VOCAB)


@pytest.fixture(scope="module")
def reference(shared_dir):
    from quant.gguf_file import GGUFFile

    md = GGUFFile(shared_dir / VOCAB).metadata
    return ReferenceBPE(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(d)
    return d


def write_gguf(path, hf_dir) -> None:
    w = gguf.GGUFWriter(str(path), "deepseek2")
    add_tokenizer_metadata(w, hf_dir)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gguf") / "tok.gguf"
    write_gguf(path, tiny_dir)
    return path


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789  \t\n.,;:!?'\"()[]{}-_+=<>/\\@#$%^&*~`|")
    alphabet += list("éüßøñçÄÖ中文字한국어日本ÿ€😁🦙½١") + [BOS, EOS, "<｜", "｜>", "\r\n", "   ", "\u00a0", "\u3000"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(n)]


# ---- llama.cpp's test vectors on the real DeepSeek vocabulary ----


def test_llama_cpp_vectors(vocab_tok, shared_dir):
    inp = (shared_dir / f"{VOCAB}.inp").read_text(encoding="utf-8")
    out = (shared_dir / f"{VOCAB}.out").read_text(encoding="utf-8")
    cases = inp.split("\n__ggml_vocab_test__\n")[:-1]  # the file ends with a separator
    expected = out.split("\n")[: len(cases)]
    assert len(cases) == 46 and len(expected) == 46
    for text, line in zip(cases, expected):
        ids = [int(x) for x in line.split()]
        assert vocab_tok.encode(text, add_bos=False) == ids, repr(text)
        assert vocab_tok.decode(ids) == text, repr(text)


def test_real_vocab_header(vocab_tok):
    t = vocab_tok
    assert (t.vocab_size, t.bos_id, t.eos_id, t.add_bos_token) == (102400, 100000, 100001, True)
    assert t.encode("Hello world")[0] == 100000 and t.encode("Hello world", add_bos=False)[0] != 100000
    assert t.encode("Hello", add_bos=True)[:1] == [100000]


def test_pre_tokenizer_matches_reference_split():
    from gguf.vocab import bytes_to_unicode

    b2u = bytes_to_unicode()
    for pre in (deepseek_llm_pre_tokenizer(), deepseek_llm_pre_tokenizer(fused=False)):
        for text in HARD_CASES + random_texts(300, seed=1):
            ours = [p for p, _ in pre.pre_tokenize_str(text)]
            ref = ["".join(b2u[b] for b in piece.encode()) for piece in reference_split(text)]
            assert ours == ref, repr(text)


# characters on the edges of the split classes: Unicode spaces (U+3000 is also punctuation), numbers inside the
# CJK range (①, Ⅻ, 〇), Greek extended letters inside it too, fullwidth letters (letters and punctuation), ...
AWKWARD = list(
    "ab Z9 \t\n\r,.!?'\"()-_~`\u3000\u2003\u00a0\u2028\u0085\x1c①Ⅻ²½١〇⑴０一中가한ぁアὟώΐΩKＡａ！～‘“—…·§😁éßµǅʰø"
)


def test_fused_pre_tokenizer_equals_six_splits():
    fused, six = deepseek_llm_pre_tokenizer(), deepseek_llm_pre_tokenizer(fused=False)
    rng = random.Random(6)
    for _ in range(5000):
        text = "".join(rng.choice(AWKWARD) for _ in range(rng.randrange(1, 16)))
        assert fused.pre_tokenize_str(text) == six.pre_tokenize_str(text), repr(text)


def test_real_vocab_matches_reference_bpe(vocab_tok, reference):
    # leave out texts with USER_DEFINED token text (ø, ü, [PAD...]): llama.cpp matches those before the BPE
    user = [t for t, k in zip(vocab_tok.tokens, vocab_tok.token_types) if k == gguf.TokenType.USER_DEFINED]
    texts = [t for t in HARD_CASES + random_texts(200, seed=2) if not any(u in t for u in user)]
    assert len(texts) > 100
    for text in texts:
        ref = reference.encode(text)
        assert vocab_tok.encode(text, add_bos=False) == ref, repr(text)
        assert vocab_tok.decode(ref) == text


def test_special_and_user_defined_tokens(vocab_tok):
    t = vocab_tok
    typed = f"a{EOS}b{BOS}"
    ids = t.encode(typed, add_bos=False)
    assert 100001 not in ids and 100000 not in ids and t.decode(ids) == typed
    assert t.encode(typed, add_bos=False, parse_special=True) == t.encode("a", add_bos=False) + [100001] + t.encode(
        "b", add_bos=False
    ) + [100000]
    assert t.decode([100001]) == "" and t.decode([100001], special=True) == EOS
    # USER_DEFINED tokens are matched in raw text even without parse_special, and decode to their raw text
    assert t.token_types[100002] == gguf.TokenType.USER_DEFINED and t.tokens[100002] == "ø"
    assert t.encode("xøy", add_bos=False) == t.encode("x", add_bos=False) + [100002] + t.encode("y", add_bos=False)
    assert t.decode([100002]) == "ø"


def test_hard_cases_round_trip(vocab_tok):
    for text in HARD_CASES + random_texts(300, seed=3):
        ids = vocab_tok.encode(text, add_bos=False)
        assert vocab_tok.decode(ids) == text, repr(text)
        assert all(0 <= i < 102400 for i in ids)
    digits = vocab_tok.encode("1234567890", add_bos=False)
    assert len(digits) == 10  # DeepSeek's vocabulary has no multi-digit tokens


def test_bad_ids_and_files(vocab_tok, tmp_path):
    with pytest.raises(LiteError, match="outside the vocabulary"):
        vocab_tok.decode([102400])
    with pytest.raises(LiteError, match="no tokenizer metadata"):
        Tokenizer.from_metadata({"general.architecture": "deepseek2"})
    with pytest.raises(LiteError, match="unsupported tokenizer model"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})


# ---- streaming decode ----


def check_stream(tok: Tokenizer, ids: list[int]) -> None:
    stream, shown = tok.stream(), ""
    for k, i in enumerate(ids, 1):
        shown += stream.add(i)
        full = tok.decode(ids[:k])
        # what was shown is the one-shot decode, less an unfinished character at the end (U+FFFD there)
        assert full in (shown, shown + "\ufffd"), (ids[:k], shown, full)
        probe = tok.stream()
        assert "".join(probe.add(j) for j in ids[:k]) + probe.flush() == full
    assert shown + stream.flush() == tok.decode(ids)


def test_stream_equals_one_shot(vocab_tok):
    for text in HARD_CASES[6:12]:
        check_stream(vocab_tok, vocab_tok.encode(text, add_bos=False))
    # byte tokens of one emoji, fed one at a time: nothing is shown until the character is complete
    ids = vocab_tok.encode("😁", add_bos=False)
    assert len(ids) > 1
    s = vocab_tok.stream()
    assert [s.add(i) for i in ids] == [""] * (len(ids) - 1) + ["😁"] and s.flush() == ""
    # an unfinished character at the end comes out of flush as U+FFFD, like the one-shot decode
    s = vocab_tok.stream()
    assert s.add(ids[0]) == "" and s.flush() == vocab_tok.decode(ids[:1]) == "\ufffd"
    rng = random.Random(4)
    check_stream(vocab_tok, [rng.randrange(102400) for _ in range(40)])  # random ids: invalid UTF-8 included


# ---- the GGUF writer, against the HF tokenizer it was written from ----


def test_gguf_from_hf_encodes_like_hf(tiny_dir, tiny_gguf):
    hf = HFTokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    ours = Tokenizer.from_gguf(tiny_gguf)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (512, 0, 1, 1)
    assert ours.add_bos_token and not ours.add_eos_token and "'Assistant: '" in ours.chat_template
    for text in HARD_CASES + random_texts(400, seed=5):
        ids = ours.encode(text, add_bos=False, parse_special=True)  # HF parses special tokens in text
        assert ids == hf.encode(text, add_special_tokens=False).ids, repr(text)
        assert ours.encode(text, parse_special=True) == hf.encode(text).ids  # BOS: add_bos_token / post-processor
        assert ours.decode(ids, special=True) == hf.decode(ids, skip_special_tokens=False), repr(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(text)
    hf.encode_special_tokens = True  # special-token text as plain text, as our default
    for text in HARD_CASES:
        assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids, repr(text)
    digits = ours.encode("123", add_bos=False)
    assert len(digits) < 3  # the tiny vocabulary merges digits: digit runs are split as one piece (\p{N}+)


def test_metadata_dict_equals_written_file(tiny_dir, tiny_gguf):
    from quant.gguf_file import GGUFFile

    md = tokenizer_metadata_from_hf(tiny_dir)
    on_disk = {k: v for k, v in GGUFFile(tiny_gguf).metadata.items() if k.startswith("tokenizer.")}
    assert md == on_disk
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "deepseek-llm"
    assert md["tokenizer.ggml.token_type"][:2] == [gguf.TokenType.CONTROL] * 2
    assert tokenizer_from_hf(tiny_dir).encode("Hello 123 混合") == Tokenizer.from_gguf(tiny_gguf).encode(
        "Hello 123 混合"
    )


def test_added_token_types_and_padding(tiny_dir, tmp_path):
    """Added tokens as llama.cpp's converter types them; ids past the tokenizer up to vocab_size are [PAD]."""
    d = tmp_path / "hf"
    d.mkdir()
    hf = HFTokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    hf.add_tokens(["<think>"])  # not special, does not look special: USER_DEFINED
    hf.add_tokens(["<｜fim▁hole｜>"])  # not special but looks special: CONTROL
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (d / "config.json").write_text(json.dumps({"vocab_size": 520}))
    md = tokenizer_metadata_from_hf(d)
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert len(tokens) == 520 and tokens[512:514] == ["<think>", "<｜fim▁hole｜>"]
    assert types[512:514] == [gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL]
    assert tokens[514:] == [f"[PAD{i}]" for i in range(514, 520)] and set(types[514:]) == {gguf.TokenType.UNUSED}
    tok = Tokenizer.from_metadata(md)
    assert 512 in tok.encode("a<think>b", add_bos=False)  # user-defined: always matched
    assert 513 not in tok.encode("a<｜fim▁hole｜>b", add_bos=False)  # control: only with parse_special
    assert 513 in tok.encode("a<｜fim▁hole｜>b", add_bos=False, parse_special=True)
    assert tok.decode([512, 513, 515]) == "<think>"  # control and unused tokens show nothing


def test_accepts_single_digit_variant(tiny_dir, tmp_path):
    """DeepSeek's own tokenizer.json may split numbers into single digits; the GGUF still says deepseek-llm."""
    from tokenizers import Regex, pre_tokenizers

    hf = HFTokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DEEPSEEK_LLM_SPLITS[:-1]]
    digits = pre_tokenizers.Digits(individual_digits=True)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, digits, byte_level])
    hf.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer_metadata_from_hf(tmp_path)["tokenizer.ggml.pre"] == "deepseek-llm"


def test_rejects_foreign_pre_tokenizer(tiny_dir, tmp_path):
    from tokenizers import pre_tokenizers

    hf = HFTokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()  # GPT-2's split rules, not DeepSeek's
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(LiteError, match="deepseek-llm"):
        tokenizer_metadata_from_hf(tmp_path)


def test_long_text_cut_at_newlines_encodes_like_one_piece(tiny_dir, tiny_gguf):
    """Texts over 64K characters are encoded in newline-cut pieces in parallel; ids must not change."""
    hf = HFTokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    hf.encode_special_tokens = True
    rng, pool = random.Random(7), HARD_CASES + random_texts(50, seed=8)
    text = "\n".join(rng.choice(pool) for _ in range(1800))
    assert len(text) > 65536  # over 2 * _CHUNK_CHARS: cut into pieces
    assert Tokenizer.from_gguf(tiny_gguf).encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids


def test_byte_tokens_decode_and_stream():
    """SentencePiece-style byte tokens (<0xE4>) decode to their byte; the stream holds partial characters."""
    tokens = ["<s>", "</s>", "a", "<0xE4>", "<0xB8>", "<0xAD>"]
    types = [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] + [gguf.TokenType.BYTE] * 3
    tok = Tokenizer(tokens, types, [], bos_id=0, eos_id=1)
    assert tok.decode([2, 3, 4, 5, 2]) == "a中a" and tok.decode([3, 4]) == "\ufffd"
    s = tok.stream()
    assert [s.add(i) for i in (2, 3, 4, 5, 1, 2)] == ["a", "", "", "中", "", "a"] and s.flush() == ""


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer.ggml.merges": ["abc"]},  # no space: not a pair
        {"tokenizer.ggml.merges": ["zzzq yyyq"]},  # tokens not in the vocabulary
        {"tokenizer.ggml.merges": [1, 2]},
        {"tokenizer.ggml.tokens": list(range(4096))},
        {"tokenizer.ggml.bos_token_id": "x"},
        {"tokenizer.ggml.bos_token_id": 10**9},
        {"tokenizer.chat_template": 5},
        {"tokenizer.ggml.model": 3},
    ],
)
def test_damaged_tokenizer_metadata_is_a_lite_error(change):
    from cli.common import DEFAULT_MODEL
    from quant.gguf_file import GGUFFile

    md = {**GGUFFile(DEFAULT_MODEL).metadata, **change}
    with pytest.raises(LiteError) as e:
        Tokenizer.from_metadata(md)
    assert "\n" not in str(e.value)
