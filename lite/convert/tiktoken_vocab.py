"""A tiktoken vocabulary (Kimi-K2's `tiktoken.model` + `tokenizer_config.json`) as GGUF `tokenizer.*` metadata.

Kimi-K2 ships no tokenizer.json: its BPE is tiktoken's, a table of "<base64 token bytes> <rank>" lines, with the
split pattern in `tokenization_kimi.py` and its special tokens in tokenizer_config.json's `added_tokens_decoder`.
This follows llama.cpp's convert_hf_to_gguf.py for it (DeepseekV2Model.set_vocab, `tokpre == "kimi-k2"`), without
running the checkpoint's Python code:

- tokens: the BPE tokens in rank order, written with GPT-2's byte-to-character map; then the special tokens at the
  ids after the ranks, as tokenization_kimi.py numbers them (a reserved name where tokenizer_config.json names
  none), all CONTROL; ids up to config.json's `vocab_size` that hold nothing become `[PAD{i}]`, UNUSED;
- merges: tiktoken keeps no merge list, only ranks. The token of rank r came from merging two tokens of lower
  rank, and running BPE on its bytes with the ranks below r stops at exactly those two (QwenModel.bpe in llama.cpp);
  one merge per token, in rank order, so a merge's priority is its token's rank, as in tiktoken;
- `tokenizer.ggml.pre` "kimi-k2"; special token ids, `add_*_token` flags and the chat template from
  `gguf.SpecialVocab` (config.json's ids), and, where config.json gives no id for a role, tokenizer_config.json's
  token name (`eos_token`, ...) looked up among the special tokens, as SpecialVocab does given a tokenizer.json;
  `add_bos_token` false unless tokenizer_config.json says otherwise (what Kimi's tokenizer and llama.cpp do).
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import logging
from pathlib import Path
from typing import Any

import gguf
from gguf.vocab import bytes_to_unicode

from lite.errors import LiteError

TIKTOKEN_FILE = "tiktoken.model"
NUM_RESERVED_SPECIAL = 256 + 2  # tokenization_kimi.py: ids n..n+257 after the n ranks are special tokens

# tokenization_kimi.py's `pat_str`, alternative by alternative. llama.cpp does not run it (its "kimi-k2" splitter
# is hand-written, lite.pretokenizers.KIMI_K2_SPLITS); it is here to recognise the checkpoint's tokenizer.
KIMI_PAT_PARTS = (
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
)
KIMI_PAT = "|".join(KIMI_PAT_PARTS)

_BYTE_CHARS = bytes_to_unicode()
_CONFIG, _FIX_CONFIG = "tokenizer_config.json", "fix or re-download tokenizer_config.json"
_TT = gguf.TokenType


def read_mergeable_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken.model's {token bytes: rank}, checked as tiktoken and the merges need it: ranks 0..n-1 each once,
    distinct tokens, and every single byte a token (so that any text can be encoded). LiteError names the line."""

    def bad(line_no: int, why: str) -> LiteError:
        return LiteError(f"{path}: line {line_no} {why}; fix or re-download {TIKTOKEN_FILE}")

    ranks: dict[bytes, int] = {}
    seen: dict[int, int] = {}  # rank -> line
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            fields = raw.split()
            if not fields:
                continue  # tiktoken skips empty lines
            if len(fields) != 2:
                raise bad(line_no, "is not '<base64 token> <rank>'")
            try:
                token = base64.b64decode(fields[0], validate=True)
                rank = int(fields[1])
            except (binascii.Error, ValueError):
                raise bad(line_no, "is not '<base64 token> <rank>'") from None
            if not token or rank < 0:
                raise bad(line_no, "has an empty token or a negative rank")
            if token in ranks:
                raise bad(line_no, f"repeats the token of rank {ranks[token]}")
            if rank in seen:
                raise bad(line_no, f"repeats rank {rank} (line {seen[rank]})")
            ranks[token], seen[rank] = rank, line_no
    if not ranks:
        raise LiteError(f"{path} holds no tokens; fix or re-download {TIKTOKEN_FILE}")
    if max(seen) != len(ranks) - 1:
        missing = min(set(range(len(ranks))) - set(seen))
        raise LiteError(f"{path}: rank {missing} is missing (ranks must be 0..n-1); fix or re-download {TIKTOKEN_FILE}")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise LiteError(
            f"{path}: {len(missing_bytes)} single bytes (0x{missing_bytes[0]:02x}, ...) are not tokens, so some text "
            f"could not be encoded; fix or re-download {TIKTOKEN_FILE}"
        )
    return ranks


def token_string(token: bytes) -> str:
    """GPT-2's printable stand-in for each byte: how byte-level BPE tokens are written in GGUF."""
    return "".join(_BYTE_CHARS[b] for b in token)


def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE of `token` with only the ranks below `max_rank`: merge the adjacent pair whose join has the
    lowest rank, the leftmost on a tie, until no join is a token of rank < max_rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> tuple[list[str], int]:
    """(the merge list, in rank order, as "left right" byte-level strings; how many multi-byte tokens no merge
    makes). A token that BPE does not bring to two parts gets no merge, as in llama.cpp; BPE never produces it."""
    merges, unreachable = [], 0
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = bpe_parts(ranks, token, rank)
        if len(parts) == 2:
            merges.append(f"{token_string(parts[0])} {token_string(parts[1])}")
        else:
            unreachable += 1
    return merges, unreachable


def _added_tokens(config: dict[str, Any]) -> dict[int, str]:
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise LiteError(f"{_CONFIG}'s added_tokens_decoder is not a mapping of ids to tokens; {_FIX_CONFIG}")
    out = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else entry
        if not isinstance(content, str):
            raise LiteError(f"{_CONFIG}'s added_tokens_decoder[{key!r}] has no content string; {_FIX_CONFIG}")
        out[int(key)] = content
    return out


def special_tokens(config: dict[str, Any], n_ranks: int) -> dict[int, str]:
    """tokenization_kimi.py's special tokens: ids n..n+257 after the n ranks, named by `added_tokens_decoder` or
    `<|reserved_token_{id}|>`. Added tokens at other ids are not tokens of Kimi's tokenizer (nor of llama.cpp's)."""
    added = _added_tokens(config)
    ids = range(n_ranks, n_ranks + NUM_RESERVED_SPECIAL)
    return {i: added.get(i, f"<|reserved_token_{i}|>") for i in ids}


def check_split_pattern(hf_dir: Path) -> None:
    """Refuse a tokenization_kimi.py whose literal `pat_str` is not Kimi-K2's: its text would split differently
    from llama.cpp's "kimi-k2". The file is parsed, never run; a pattern built some other way is not judged."""
    path = hf_dir / "tokenization_kimi.py"
    if not path.is_file():
        return
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pat_str" for t in node.targets):
            pattern = _literal_pattern(node.value)
            if pattern is not None and pattern != KIMI_PAT:
                raise LiteError(
                    f"{path}: its pat_str is not Kimi-K2's split pattern; lite converts only Kimi-K2's tiktoken "
                    "tokenizer (tokenizer.ggml.pre kimi-k2)"
                )


def _literal_pattern(value: ast.expr) -> str | None:
    """A string literal, or `"sep".join([literals])`, as tokenization_kimi.py writes its pattern."""
    try:
        if isinstance(value, ast.Constant):
            return value.value if isinstance(value.value, str) else None
        if (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute)
            and value.func.attr == "join"
            and isinstance(value.func.value, ast.Constant)
            and len(value.args) == 1
        ):
            sep, parts = value.func.value.value, ast.literal_eval(value.args[0])
            if isinstance(sep, str) and all(isinstance(p, str) for p in parts):
                return sep.join(parts)
    except (ValueError, TypeError, SyntaxError):
        pass
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise LiteError(f"{path} is not a JSON object; fix or re-download it")
    return data


def _special_vocab(hf_dir: Path, config: dict[str, Any], names: dict[str, int]) -> gguf.SpecialVocab:
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(hf_dir, load_merges=False)
    finally:
        log.setLevel(level)
    for typ in special.special_token_types:
        if typ in special.special_token_ids:
            continue
        entry = config.get(f"{typ}_token")
        name = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(name, str) and name in names:
            special.special_token_ids[typ] = names[name]
    return special


def add_tiktoken_metadata(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int | None) -> list[str]:
    """Write `hf_dir`'s tiktoken tokenizer into `writer` as llama.cpp's converter does for Kimi-K2; returns notes
    for the conversion summary. Raises LiteError for a malformed tiktoken.model or tokenizer_config.json."""
    check_split_pattern(hf_dir)
    ranks = read_mergeable_ranks(hf_dir / TIKTOKEN_FILE)
    tok_config = _read_json(hf_dir / "tokenizer_config.json")
    specials = special_tokens(tok_config, len(ranks))
    n = vocab_size if vocab_size is not None else len(ranks) + NUM_RESERVED_SPECIAL
    if n < len(ranks):
        raise LiteError(f"config.json's vocab_size {n} is smaller than {TIKTOKEN_FILE}'s {len(ranks)} tokens")

    by_id = {rank: token_string(token) for token, rank in ranks.items()}
    tokens, types = [], []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(_TT.NORMAL))
        elif i in specials:
            tokens.append(specials[i])
            types.append(int(_TT.CONTROL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(_TT.UNUSED))
    merges, unreachable = merges_from_ranks(ranks)
    names = {t: i for i, t in specials.items() if i < n}
    special = _special_vocab(hf_dir, tok_config, names)
    # Kimi's tokenizer adds no BOS, and neither does llama.cpp for a gpt2 vocabulary without this key; lite (and
    # other readers) default to adding one, so say it
    special.add_special_token.setdefault("bos", False)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("kimi-k2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special.add_to_gguf(writer, quiet=True)
    notes = [f"tokenizer from {TIKTOKEN_FILE}: {len(ranks)} BPE tokens, {len(merges)} merges rebuilt from the ranks"]
    if unreachable:
        notes.append(f"{unreachable} tokens of {TIKTOKEN_FILE} are made by no merge (BPE never produces them)")
    return notes
