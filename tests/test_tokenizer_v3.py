"""The `deepseek-v3` pre-tokenizer (DeepSeek-V3/R1 GGUFs) against llama.cpp's own tokenizer on the same vocabulary.

No DeepSeek-V3 vocabulary is available here, so the test gives the real DeepSeek LLM vocabulary of ../shared the
`deepseek-v3` pre-tokenizer (`tokenizer.ggml.pre`) in a copy of its GGUF: llama.cpp then splits text with its
DEEPSEEK3_LLM regexes, and lite must produce the same ids for text that exercises every rule.
"""

from __future__ import annotations

import random
from pathlib import Path

import gguf
import pytest

from lite.tokenizer import Tokenizer
from quant.gguf_file import GGUFFile

TEXTS = [
    "Hello, world! 1234567 89 0.5 -3e10\n\n\nNew paragraph:\tTabs  and   spaces   \n  \r\n",
    "日本語のテキスト、カタカナ、ひらがな。漢字123と数字４５６。中文句子，标点！",
    "don't I'm we'll #hashtag @user [link](http://x.y/z?a=1&b=2) `code` {json: [1, 2]} a.b.c",
    "Ünïcödé café naïve résumé — “quotes” ‘single’ … ½ ∑ ∞ ≠ 🙂🎉 \u00a0nbsp\u2009thin",
    "x" * 5 + "  " + "\n" * 3 + "end",
]


def relabelled_vocab(shared_dir: Path, out: Path, pre: str, drop: tuple[str, ...] = ()) -> Path:
    """The shared DeepSeek LLM vocabulary GGUF with `tokenizer.ggml.pre` set to `pre` and the keys `drop` left out."""
    src = GGUFFile(shared_dir / "vocab" / "ggml-vocab-deepseek-llm.gguf")
    w = gguf.GGUFWriter(str(out), src.metadata["general.architecture"])
    for key, field in src.reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        value = pre if key == "tokenizer.ggml.pre" else src.metadata[key]
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, field.types[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def v3_vocab(shared_dir, tmp_path_factory) -> Path:
    """The shared DeepSeek LLM vocabulary, relabelled with the `deepseek-v3` pre-tokenizer."""
    return relabelled_vocab(shared_dir, tmp_path_factory.mktemp("v3vocab") / "vocab-deepseek-v3.gguf", "deepseek-v3")


def test_deepseek_v3_pre_tokenizer_matches_llama_cpp(v3_vocab, shared_dir):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference tokenizer here")
    ref = llama_cpp.Llama(model_path=str(v3_vocab), vocab_only=True, verbose=False)
    ours = Tokenizer.from_gguf(str(v3_vocab))
    assert ours.pre == "deepseek-v3"
    corpus = (shared_dir / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    rng = random.Random()
    start = rng.randrange(len(corpus) - 5000)
    texts = [*TEXTS, corpus[start : start + 5000]]
    for text in texts:
        want = ref.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        got = ours.encode(text, add_bos=False)
        assert got == want, (text[:60], got[:20], want[:20])
    # the two pre-tokenizers really differ (this vocabulary's merges rarely show it): digits in threes, newlines
    # kept together, punctuation joined to the letters after it
    from lite.tokenizer import pre_tokenizer

    def pieces(pre: str, text: str) -> list[str]:
        return [p for p, _ in pre_tokenizer(pre).pre_tokenize_str(text)]

    assert pieces("deepseek-v3", "1234567\n\n#tag") == ["123", "456", "7", "ĊĊ", "#tag"]
    assert pieces("deepseek-llm", "1234567\n\n#tag") == ["1234567", "Ċ", "Ċ", "#", "tag"]


def test_convert_labels_a_deepseek_v3_tokenizer(tmp_path):
    """A checkpoint whose tokenizer.json splits as DeepSeek-V3's does converts with `tokenizer.ggml.pre`
    "deepseek-v3", and lite then encodes exactly as that tokenizer.json does."""
    from tiny_models import make_checkpoint
    from tiny_tokenizer import write_tiny_tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    from lite.convert import convert
    from lite.tokenizer import pre_tokenizer

    hf_dir = make_checkpoint(tmp_path / "hf", "lite", seed=3)
    write_tiny_tokenizer(hf_dir)
    path = hf_dir / "tokenizer.json"
    hf = HFTokenizer.from_file(str(path))
    hf.pre_tokenizer = pre_tokenizer("deepseek-v3")
    hf.save(str(path))
    out = convert(hf_dir, tmp_path / "v3tok.gguf", outtype="f32").out_path
    f = GGUFFile(out)
    assert f.metadata["tokenizer.ggml.pre"] == "deepseek-v3"
    ours = Tokenizer.from_gguf(f)
    for text in TEXTS:
        assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids, text[:40]


@pytest.mark.parametrize("pre", ["deepseek-llm", "deepseek-v3", "kimi-k2"])
def test_a_missing_add_bos_token_key_follows_llama_cpp(pre, shared_dir, tmp_path):
    """A GGUF without `tokenizer.ggml.add_bos_token` (llama.cpp's converter omits it for tiktoken vocabularies):
    lite adds a BOS exactly when llama.cpp does."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference tokenizer here")
    out = relabelled_vocab(shared_dir, tmp_path / f"vocab-{pre}.gguf", pre, drop=("tokenizer.ggml.add_bos_token",))
    ref = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    ours = Tokenizer.from_gguf(str(out))
    assert ours.encode("Hello there") == ref.tokenize(b"Hello there", add_bos=True, special=False)
