"""Write an HF tokenizer (`tokenizer.json` + `tokenizer_config.json`) as GGUF `tokenizer.*` metadata.

Follows llama.cpp's convert_hf_to_gguf.py for DeepSeek-V2 (`_set_vocab_gpt2`): one token per id up to the
model's `vocab_size` (missing ids become `[PAD{i}]`, UNUSED), added tokens typed CONTROL when special or when
they look special (`<｜...｜>`, `<|...|>`) and USER_DEFINED otherwise, everything else NORMAL; merges, special
token ids, `add_*_token` flags and the chat template come from `gguf.SpecialVocab`, as in llama.cpp.
A folder with no tokenizer.json but a tiktoken vocabulary (Kimi-K2's tiktoken.model) goes to tiktoken_vocab.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lite.convert.tiktoken_vocab import TIKTOKEN_FILE, add_tiktoken_metadata
from lite.errors import LiteError
from lite.tokenizer import DEEPSEEK_LLM_SPLITS, deepseek_llm_pre_tokenizer, pre_tokenizer

_K = gguf.Keys.Tokenizer
_TT = gguf.TokenType

# Strings on which DeepSeek's pre-tokenizer must agree with ours before we label the vocabulary `deepseek-llm`
# (llama.cpp identifies pre-tokenizers by hashing the encoding of a probe text in the same spirit).
_PRE_TOKENIZER_PROBE = "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～ 3.14 \n\n\t  Ὗὠ ΐ Ω K 한국어  ,.; x  "


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's `does_token_look_special`."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _deepseek_with_single_digits() -> pre_tokenizers.PreTokenizer:
    """DeepSeek's tokenizer.json variant: numbers split into single digits (llama.cpp keeps runs, \\p{N}+)."""
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DEEPSEEK_LLM_SPLITS[:-1]]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.Digits(individual_digits=True), byte_level])


def _check_pre_tokenizer(hf: HFTokenizer, path: Path) -> str:
    """The `tokenizer.ggml.pre` name of the tokenizer's splits: DeepSeek LLM's (`deepseek-llm`, the V2 family) or
    DeepSeek-V3's (`deepseek-v3`). Anything else is refused: llama.cpp would tokenize it differently.

    DeepSeek's V2 vocabularies hold no multi-digit tokens, so splitting numbers into single digits (as DeepSeek's
    tokenizer.json may) or into runs (as llama.cpp does) gives the same ids; both forms are accepted.
    """

    def pieces(pre: pre_tokenizers.PreTokenizer | None) -> list[str]:
        return [piece for piece, _ in pre.pre_tokenize_str(_PRE_TOKENIZER_PROBE)] if pre is not None else []

    theirs = pieces(hf.pre_tokenizer)
    if theirs in (pieces(deepseek_llm_pre_tokenizer()), pieces(_deepseek_with_single_digits())):
        return "deepseek-llm"
    if theirs == pieces(pre_tokenizer("deepseek-v3")):
        return "deepseek-v3"
    raise LiteError(
        f"{path}: the tokenizer's pre-tokenizer is neither DeepSeek LLM's (deepseek-llm) nor DeepSeek-V3's "
        "(deepseek-v3); only those DeepSeek tokenizers are supported"
    )


def _config_vocab_size(hf_dir: Path) -> int | None:
    config = hf_dir / "config.json"
    if config.is_file():
        size = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
        return None if size is None else int(size)
    return None


def _vocab_size(hf_dir: Path, n_tokens: int) -> int:
    size = _config_vocab_size(hf_dir)
    return n_tokens if size is None else size


def _tokens_and_types(hf_dir: Path) -> tuple[list[str], list[int], str]:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise LiteError(f"no tokenizer.json or {TIKTOKEN_FILE} in {hf_dir}; convert from a checkpoint that has one")
    hf = HFTokenizer.from_file(str(path))
    pre = _check_pre_tokenizer(hf, path)
    vocab = hf.get_vocab(with_added_tokens=True)
    vocab_size = _vocab_size(hf_dir, len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise LiteError(f"{path}: token id {max(vocab.values())} is beyond the model's vocab_size {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = {i: tok for i, tok in hf.get_added_tokens_decoder().items()}

    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(_TT.UNUSED)
        elif i in added:
            a = added[i]
            if not a.normalized:  # llama.cpp expects added tokens pre-normalised: encode and decode them once
                token = hf.decode(hf.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if a.special or _looks_special(token):
                types.append(_TT.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalise user-defined spaces
                types.append(_TT.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(_TT.NORMAL)
    return tokens, [int(t) for t in types], pre


def _special_vocab(hf_dir: Path) -> gguf.SpecialVocab:
    # SpecialVocab logs a warning for DeepSeek's "BOS A BOS B" pair template, which llama.cpp ignores too
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(hf_dir, load_merges=True)
    finally:
        log.setLevel(level)


def tokenizer_metadata_from_hf(hf_dir: str | Path) -> dict[str, Any]:
    """The GGUF `tokenizer.*` keys, as plain Python values, that `add_tokenizer_metadata` writes for `hf_dir`."""
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])  # in memory, never written
    add_tokenizer_metadata(writer, hf_dir)
    return {key: kv.value for key, kv in writer.kv_data[0].items() if key.startswith("tokenizer.")}


def has_tokenizer(hf_dir: Path) -> bool:
    """Whether `hf_dir` holds a tokenizer lite converts: tokenizer.json, or Kimi-K2's tiktoken.model."""
    return (hf_dir / "tokenizer.json").is_file() or (hf_dir / TIKTOKEN_FILE).is_file()


def add_tokenizer_metadata(writer: gguf.GGUFWriter, hf_dir: str | Path) -> list[str]:
    """Write `hf_dir`'s tokenizer into `writer` as llama.cpp's converter does for DeepSeek-V2 (or, for a tiktoken
    vocabulary, for Kimi-K2); returns notes for the summary. A malformed tokenizer.json, tiktoken.model or
    tokenizer_config.json raises LiteError (the parsers' own errors are of many types)."""
    hf_dir = Path(hf_dir)
    # llama.cpp tries tokenizer.json first too (_set_vocab_gpt2), and only then the tiktoken vocabulary
    tiktoken = not (hf_dir / "tokenizer.json").is_file() and (hf_dir / TIKTOKEN_FILE).is_file()
    vocab_file = TIKTOKEN_FILE if tiktoken else "tokenizer.json"
    try:
        if tiktoken:
            return add_tiktoken_metadata(writer, hf_dir, _config_vocab_size(hf_dir))
        tokens, types, pre = _tokens_and_types(hf_dir)
        special = _special_vocab(hf_dir)
    except LiteError:
        raise
    except Exception as e:  # tokenizers raises a bare Exception, json a ValueError, gguf KeyError/TypeError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LiteError(
            f"cannot read the tokenizer in {hf_dir} ({reason}); fix or re-download {vocab_file} and "
            f"tokenizer_config.json, or remove {vocab_file} to convert without a tokenizer"
        ) from None
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
    return []
