"""`lite convert` of a Kimi-K2 checkpoint's tiktoken tokenizer (tiktoken.model, no tokenizer.json), against tiktoken's
own encoding and llama.cpp's.

The vocabulary is a small byte-level BPE trained, fresh each run, on the pieces of Kimi's split pattern (so that, as
in Kimi's real vocabulary, no token crosses a piece), written as tiktoken.model next to a tokenizer_config.json
with special tokens after the ranks, in a tiny random Kimi-K2-like checkpoint.

Where the references differ: llama.cpp does not run Kimi's regex but a hand-written "kimi-k2" splitter
(lite.pretokenizers.KIMI_K2_SPLITS), which lite follows for GGUF files. It differs from the regex on camel case
(the regex cuts "get|User|Name"), on combining marks and the emoji variation selector U+FE0F (letters to the regex:
"⭐️x" is one piece), and on Han outside llama.cpp's code-point blocks (々 〇). So the tiktoken comparison runs on
texts whose pieces the two agree on: corpus slices, CJK, digits, contractions, whitespace runs, emoji (checked to
agree, every one), and the random strings of awkward characters that happen to agree; llama.cpp's ids are
compared on every text.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
from gguf.vocab import bytes_to_unicode
from test_tokenizer_kimi import ALPHABET, TEXTS, vocab_only
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, trainers
from tokenizers.pre_tokenizers import ByteLevel

from lite.chat_template import KIMI_K2_CHAT_TEMPLATE
from lite.convert.tokenizer_meta import tokenizer_metadata_from_hf
from lite.pretokenizers import pre_tokenizer
from lite.tokenizer import Tokenizer
from quant.gguf_file import GGUFFile

tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is the reference encoder of a tiktoken vocabulary")
regex = pytest.importorskip("regex", reason="the `regex` module runs Kimi's split pattern to find its pieces")

# tokenization_kimi.py's pat_str (moonshotai/Kimi-K2-Instruct), alternative by alternative
KIMI_PAT_PARTS = [
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
]
KIMI_PAT = "|".join(KIMI_PAT_PARTS)
KIMI_REGEX = regex.compile(KIMI_PAT, flags=regex.V1)  # V1: the class intersections (&&) as tiktoken's regex has them
# Kimi-K2's special tokens at their offsets after the ranks (163584 + offset in the real vocabulary)
SPECIALS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
    7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]",
}  # fmt: skip
N_TOKENS = 1000
_CHAR = bytes_to_unicode()
_BYTE = {c: b for b, c in _CHAR.items()}

HAN = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天"
KANA_HANGUL = "ぁあいうえおかきくけこさしすせそアイウエオカキクケコ한국어텍스트안녕하세요"
CJK_PUNCT = "，。！？、「」《》（）"
WORDS = ["don't", "DON'T", "I'm", "we'll", "you're", "they've", "he'd", "it's", "'tis", "o'er", "rock'n'roll",
         "O'Neil", "can't", "SHE'LL", "We'Re", "I'VE", "she'D"]  # fmt: skip
# no variation selector U+FE0F ("❤️"): a mark, so a letter to Kimi's regex, it splits where llama.cpp's splitter does not
EMOJI = ["🙂", "🎉", "👍🏽", "👨\u200d👩\u200d👧", "😀", "✓", "→", "©", "🇯🇵", "♥"]


def _texts(rng: random.Random, corpus: str) -> dict[str, Callable[[], str]]:
    """Generators of the texts on which Kimi's regex and llama.cpp's splitter agree, by kind."""

    def pick(items, lo: int, hi: int, sep: str = "") -> str:
        return sep.join(rng.choice(items) for _ in range(rng.randrange(lo, hi)))

    def corpus_slice() -> str:
        start = rng.randrange(len(corpus) - 400)
        return corpus[start : start + rng.randrange(1, 400)]

    return {
        "corpus": corpus_slice,
        "cjk": lambda: pick([*HAN, *KANA_HANGUL, *CJK_PUNCT, " ", "abc", "12"], 1, 30),
        "digits": lambda: pick([str(rng.randrange(10 ** rng.randrange(1, 13))), "3.14", "-7", "1st", "个"], 1, 8, " "),
        "contractions": lambda: pick(WORDS, 1, 8, rng.choice([" ", ", ", "\n"])),
        "whitespace": lambda: pick([" ", "  ", "\t", "\n", "\r\n", "\n\n", "x", "ab", ".", "\u3000", "\u00a0"], 1, 20),
        "emoji": lambda: pick([*EMOJI, " ", " ok", "!", "\n", "7"], 1, 15),
    }


def regex_pieces(text: str) -> list[str]:
    return KIMI_REGEX.findall(text)


def llama_cpp_pieces(text: str) -> list[str]:
    return [bytes(_BYTE[c] for c in p).decode() for p, _ in pre_tokenizer("kimi-k2").pre_tokenize_str(text)]


def train_ranks(texts: list[str], size: int) -> dict[bytes, int]:
    """{token bytes: rank} of a byte-level BPE trained on the regex pieces of `texts`: all 256 bytes, then the
    merged tokens in the order training made them (a tiktoken rank is that order)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)  # each piece is one word
    trainer = trainers.BpeTrainer(
        vocab_size=size, min_frequency=1, initial_alphabet=ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator([p for t in texts for p in regex_pieces(t)], trainer)
    vocab = json.loads(hf.to_str())["model"]["vocab"]
    return {bytes(_BYTE[c] for c in token): rank for token, rank in vocab.items()}


def write_tiktoken_tokenizer(folder: Path, ranks: dict[bytes, int], chat_template: str | None = None) -> None:
    """tiktoken.model, tokenizer_config.json and a tokenization_kimi.py laid out like Kimi-K2-Instruct's."""
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (folder / "tiktoken.model").write_text("".join(lines))
    n = len(ranks)
    added = {str(n + k): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                          "special": True} for k, t in SPECIALS.items()}  # fmt: skip
    config = {"added_tokens_decoder": added, "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]",
              "unk_token": "[UNK]", "tokenizer_class": "TikTokenTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}  # fmt: skip
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    parts = ",\n".join(f'            r"""{p}"""' for p in KIMI_PAT_PARTS)  # as the file has them
    (folder / "tokenization_kimi.py").write_text(
        f'class TikTokenTokenizer:\n    pat_str = "|".join(\n        [\n{parts}\n        ]\n    )\n'
    )


def tiktoken_encoding(ranks: dict[bytes, int]):
    """The encoding tokenization_kimi.py builds: the ranks, and 258 special tokens after them."""
    n = len(ranks)
    specials = {f"<|reserved_token_{i}|>": i for i in range(n, n + 258) if i - n not in SPECIALS}
    specials.update({t: n + k for k, t in SPECIALS.items()})
    return tiktoken.Encoding("kimi-test", pat_str=KIMI_PAT, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def corpus(shared_dir) -> str:
    return (shared_dir / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ranks(corpus) -> dict[bytes, int]:
    rng = random.Random()
    start = rng.randrange(len(corpus) - 100_000)
    gens = _texts(rng, corpus)
    extra = [gen() for name, gen in gens.items() if name != "corpus" for _ in range(300)]
    ranks = train_ranks([corpus[start : start + 100_000], *extra, *TEXTS], N_TOKENS)
    assert sorted(ranks.values()) == list(range(N_TOKENS)) and all(ranks.get(bytes([b]), 256) < 256 for b in range(256))
    return ranks


@pytest.fixture(scope="module")
def kimi_hf(ranks, tmp_path_factory) -> Path:
    """A tiny random Kimi-K2-like checkpoint with the tiktoken tokenizer; vocab_size cuts the last two of the 258
    special ids, as Kimi-K2's 163840 does."""
    from tiny_models import make_checkpoint

    n = len(ranks)
    hf = make_checkpoint(tmp_path_factory.mktemp("hf_kimi_tiktoken"), "kimi", seed=6, vocab_size=n + 256,
                         bos_token_id=n, eos_token_id=n + 1)  # fmt: skip
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    write_tiktoken_tokenizer(hf, ranks, KIMI_K2_CHAT_TEMPLATE)
    return hf


@pytest.fixture(scope="module")
def converted(kimi_hf, tmp_path_factory) -> Path:
    from cli.main import main

    out = tmp_path_factory.mktemp("kimi_gguf") / "kimi.gguf"
    assert main(["convert", str(kimi_hf), "-o", str(out), "--outtype", "f32"]) == 0
    return out


# ---- the converted vocabulary ----


def test_metadata_is_llama_cpps_layout(converted, ranks):
    md = GGUFFile(converted).metadata
    n = len(ranks)
    by_rank = {r: "".join(_CHAR[b] for b in t) for t, r in ranks.items()}
    want = [by_rank[i] for i in range(n)]
    want += [SPECIALS.get(k, f"<|reserved_token_{n + k}|>") for k in range(256)]  # 258 specials, cut to vocab_size
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "kimi-k2"
    assert list(md["tokenizer.ggml.tokens"]) == want
    assert list(md["tokenizer.ggml.token_type"]) == [1] * n + [3] * 256  # NORMAL, then CONTROL
    assert md["tokenizer.ggml.bos_token_id"] == n and md["tokenizer.ggml.eos_token_id"] == n + 1
    assert md["tokenizer.ggml.padding_token_id"] == n + 255 and md["tokenizer.ggml.unknown_token_id"] == n + 254
    assert md["tokenizer.chat_template"] == KIMI_K2_CHAT_TEMPLATE and md["tokenizer.ggml.add_bos_token"] is False
    assert len(md["tokenizer.ggml.merges"]) == n - 256  # one merge for each token above the bytes


def bpe_with_merges(merges: list[str], word: str) -> list[str]:
    """Merge-list BPE (what llama.cpp and lite run): merge the adjacent pair of lowest merge index, leftmost first."""
    priority = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    parts = list(word)
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: priority.get((parts[i], parts[i + 1]), len(merges)))
        if (parts[best], parts[best + 1]) not in priority:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def test_the_merges_give_back_every_token(converted, ranks):
    """What llama.cpp's reconstruction relies on: BPE with the rebuilt merges, on each token's bytes, ends at that
    very token (and a merge's order is its token's rank, as tiktoken merges by rank)."""
    md = GGUFFile(converted).metadata
    merges = list(md["tokenizer.ggml.merges"])
    for token, rank in ranks.items():
        word = "".join(_CHAR[b] for b in token)
        assert bpe_with_merges(merges, word) == [word], (token, rank)
        if len(token) > 1:
            assert "".join(merges[rank - 256].split(" ")) == word  # tokens above the 256 bytes, in rank order


def test_tokenizer_matches_tiktoken(converted, ranks, corpus):
    tok, enc = Tokenizer.from_gguf(converted), tiktoken_encoding(ranks)
    rng = random.Random()
    texts = {name: [gen() for _ in range(150)] for name, gen in _texts(rng, corpus).items()}
    for name, batch in texts.items():
        for text in batch:  # the kinds of text on which Kimi's regex and llama.cpp's splitter agree
            assert regex_pieces(text) == llama_cpp_pieces(text), (name, text)
    awkward = ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 40))) for _ in range(400)]
    agreeing = [t for t in [*TEXTS, *awkward] if regex_pieces(t) == llama_cpp_pieces(t)]
    assert len(agreeing) > 20  # enough of them still agree to be worth comparing
    for text in [*(t for batch in texts.values() for t in batch), *agreeing]:
        want = enc.encode(text, disallowed_special=())
        assert tok.encode(text, add_bos=False) == want, text
        assert tok.decode(want) == text
    # special tokens in text, when asked for, as tiktoken's allowed_special
    text = "<|im_user|>user<|im_middle|>你好 world<|im_end|>[EOS]<|reserved_token_1005|>"
    assert tok.encode(text, add_bos=False, parse_special=True) == enc.encode(text, allowed_special="all")


def test_the_splits_differ_where_documented():
    """The texts the tiktoken comparison leaves to llama.cpp: lite follows llama.cpp's "kimi-k2" splitter there."""
    for text in ("getUserName", "⭐️x", "❤️👍", "e\u0301te", "人々", "〇〇〇〇"):
        assert regex_pieces(text) != llama_cpp_pieces(text), text


def test_tokenizer_matches_llama_cpp(converted, corpus):
    ref, ours = vocab_only(converted), Tokenizer.from_gguf(converted)
    rng = random.Random()
    texts = [gen() for gen in _texts(rng, corpus).values() for _ in range(60)]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 40))) for _ in range(200)]
    for text in [*TEXTS, *texts]:
        want = ref.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert ours.encode(text, add_bos=False) == want, text
    # no BOS added, as llama.cpp and Kimi's tokenizer do (its tokenizer_config.json sets no add_bos_token)
    assert ours.encode("hi") == ref.tokenize(b"hi") and ours.bos_id not in ours.encode("hi")
    assert ours.eog_ids == {ours.eos_id, ours.tokens.index("<|im_end|>"), ours.tokens.index("[EOT]")}


# ---- other layouts ----


def test_ids_from_tokenizer_config_where_config_json_has_none(ranks, tmp_path):
    """config.json's ids win, as in llama.cpp; without them tokenizer_config.json's names are looked up among the
    special tokens. Ids up to a larger vocab_size that hold nothing become [PADi], UNUSED, as llama.cpp pads."""
    n = len(ranks)
    write_tiktoken_tokenizer(tmp_path, ranks)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": n + 300, "eos_token_id": n + 2}))
    md = tokenizer_metadata_from_hf(tmp_path)
    assert md["tokenizer.ggml.eos_token_id"] == n + 2 and md["tokenizer.ggml.bos_token_id"] == n
    assert md["tokenizer.ggml.tokens"][n + 257] == "<|reserved_token_" + str(n + 257) + "|>"
    assert md["tokenizer.ggml.tokens"][n + 258 :] == [f"[PAD{i}]" for i in range(n + 258, n + 300)]
    assert md["tokenizer.ggml.token_type"][n + 258 :] == [int(gguf.TokenType.UNUSED)] * 42
    assert "tokenizer.chat_template" not in md


def test_tokenizer_json_comes_first(tmp_path, ranks):
    """A folder with both is converted from tokenizer.json, as llama.cpp's converter tries it first."""
    from tiny_tokenizer import write_tiny_tokenizer

    write_tiktoken_tokenizer(tmp_path, ranks)
    write_tiny_tokenizer(tmp_path)
    assert tokenizer_metadata_from_hf(tmp_path)["tokenizer.ggml.pre"] == "deepseek-llm"


# ---- bad input: one line ----


@pytest.fixture
def kimi_copy(kimi_hf, tmp_path) -> Path:
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in kimi_hf.iterdir():  # the weights by link, the small files copied
        (hf / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, hf / f.name)
    return hf


def _edit_line(index: int, new: str | None) -> Callable[[list[str]], list[str]]:
    def edit(lines: list[str]) -> list[str]:
        return [*lines[:index], *([new] if new is not None else []), *lines[index + 1 :]]

    return edit


@pytest.mark.parametrize(
    "edit, reason",
    [
        (_edit_line(3, "not*base64 3"), "line 4 is not '<base64 token> <rank>'"),
        (_edit_line(3, "QUJD"), "line 4 is not '<base64 token> <rank>'"),
        (_edit_line(3, "QUJD x"), "line 4 is not '<base64 token> <rank>'"),
        (lambda lines: [*lines, lines[-1]], f"line {N_TOKENS + 1} repeats the token of rank {N_TOKENS - 1}"),
        (lambda lines: [*lines, f"AAECAw== {N_TOKENS - 2}"], f"line {N_TOKENS + 1} repeats rank {N_TOKENS - 2}"),
        (_edit_line(500, None), "rank 500 is missing (ranks must be 0..n-1)"),
        (lambda lines: ["YQ== 0", "Yg== 1"], "single bytes (0x00, ...) are not tokens"),
        (lambda lines: [], "holds no tokens"),
    ],
)
def test_malformed_tiktoken_model_is_one_line(kimi_copy, tmp_path, lite, edit, reason):
    path = kimi_copy / "tiktoken.model"
    path.write_text("".join(line + "\n" for line in edit(path.read_text().splitlines())))
    r = lite("convert", str(kimi_copy), "-o", str(tmp_path / "m.gguf"), check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert reason in r.stderr and "fix or re-download tiktoken.model" in r.stderr, r.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_other_bad_tokenizer_files_are_one_line(kimi_copy, tmp_path, lite):
    def convert() -> str:
        r = lite("convert", str(kimi_copy), "-o", str(tmp_path / "m.gguf"), "--dry-run", check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        return r.stderr.strip()

    config = json.loads((kimi_copy / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (kimi_copy / "tokenizer_config.json").write_text(json.dumps(config))
    r = lite("convert", str(kimi_copy), "-o", str(tmp_path / "m.gguf"), "--dry-run")
    assert "no chat template in tokenizer_config.json: `lite chat` will use Kimi-K2's built-in format" in r.stdout
    (kimi_copy / "tokenizer_config.json").write_text("{bad")
    assert convert() == (
        f"error: cannot read the tokenizer in {kimi_copy} (Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1)); fix or re-download tiktoken.model and tokenizer_config.json, or remove tiktoken.model "
        "to convert without a tokenizer"
    )
    (kimi_copy / "tokenizer_config.json").unlink()  # no special token names: all reserved, still a tokenizer
    assert lite("convert", str(kimi_copy), "-o", str(tmp_path / "m.gguf"), "--dry-run").returncode == 0
    # a tokenization_kimi.py splitting by another pattern (Llama 3's) is not Kimi-K2's tokenizer
    llama3 = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+"
    )
    (kimi_copy / "tokenization_kimi.py").write_text(f"class T:\n    pat_str = {llama3!r}\n")
    assert "its pat_str is not Kimi-K2's split pattern" in convert()
