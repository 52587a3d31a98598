"""The byte-level BPE tokenizer of DeepSeek-family models, built on the `tokenizers` library and read from GGUF or HF
files.

It reproduces llama.cpp's tokenizer for the `tokenizer.ggml.pre` types of lite.pretokenizers (deepseek-llm,
deepseek-v3, kimi-k2): the same pre-tokenizer splits, the same BPE merges, and the same treatment of token types
(control tokens are parsed from text only on request, user-defined tokens always; user-defined tokens decode to
their raw text, normal tokens through the byte-level map).
"""

from __future__ import annotations

import codecs
import os
import re
from typing import Any

from gguf.vocab import bytes_to_unicode
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from lite.chat_template import default_chat_template, render_chat_template
from lite.errors import LiteError
from lite.pretokenizers import DEEPSEEK_LLM_SPLITS as DEEPSEEK_LLM_SPLITS  # re-exported (tokenizer_gguf, tests)
from lite.pretokenizers import PRE_TYPES, pre_tokenizer
from lite.pretokenizers import deepseek_llm_pre_tokenizer as deepseek_llm_pre_tokenizer

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType values
_END_OF_TURN = ("<|im_end|>", "[EOT]")  # Kimi-K2's, in llama.cpp's list of end-of-generation texts


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level map inverted: printable stand-in character -> byte."""
    return {ch: b for b, ch in bytes_to_unicode().items()}


class Tokenizer:
    """Byte-level BPE (`tokenizer.ggml.model` gpt2, `pre` one of PRE_TYPES), built on `tokenizers`.

    Token types follow llama.cpp: CONTROL tokens (BOS, EOS, ...) are matched in text only with
    `parse_special=True` and decode to nothing unless `special=True`; USER_DEFINED tokens are always matched
    and decode to their raw text; NORMAL tokens go through the BPE and the byte-level map.
    One Tokenizer should not encode from several threads at once (`parse_special` is a flag on the shared
    `tokenizers` object).
    """

    def __init__(
        self,
        tokens: list[str],
        token_types: list[int] | None,
        merges: list[str],
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        pre: str = "deepseek-llm",
    ):
        if pre not in PRE_TYPES:
            raise LiteError(
                f"unsupported tokenizer pre-tokenizer {pre!r} (tokenizer.ggml.pre); lite reads "
                f"{', '.join(repr(p) for p in PRE_TYPES)}"
            )
        self.pre = pre
        n = len(tokens)
        types = list(token_types) if token_types is not None else [_NORMAL] * n
        if len(types) != n:
            raise LiteError(f"tokenizer has {n} tokens but {len(types)} token types; the GGUF file is damaged")
        for name, tid in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
            if tid is not None and not 0 <= tid < n:
                raise LiteError(f"tokenizer {name} id {tid} is outside the vocabulary of {n}; the file is damaged")
        self.tokens, self.token_types = list(tokens), types
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template
        # llama.cpp also ends generation at end-of-turn tokens it knows by their text: a Kimi-K2 file's EOS is
        # "[EOS]", but the model closes each turn with "<|im_end|>"
        ends = {i for i, t in enumerate(self.tokens) if t in _END_OF_TURN}
        self.eog_ids = frozenset(ends | ({eos_id} if eos_id is not None else set()))
        self._hf = self._build(merges)
        self._default_template = default_chat_template({t for t, k in zip(self.tokens, types) if k != _NORMAL})
        # long texts may be cut after newlines (no piece crosses one) unless an added token spans a newline
        # (deepseek-v3's "\s*[\r\n]+" makes pieces of several newlines: never cut there)
        self._cut_ok = pre == "deepseek-llm" and not any("\n" in t for t, k in zip(self.tokens, types) if k != _NORMAL)
        self._pieces: list[bytes | None] = [None] * n  # lazily filled decode table
        # control-token texts, longest first (as `tokenizers` matches them), and their private-use stand-ins
        kinds = (_CONTROL, _UNKNOWN)
        self._control_ids = {t: i for i, (t, k) in enumerate(zip(self.tokens, types)) if k in kinds and t}
        texts = sorted(self._control_ids, key=len, reverse=True)
        usable = 0 < len(texts) <= 0xF8FF - 0xE000
        self._control_re = re.compile("|".join(map(re.escape, texts))) if usable else None
        self._hide = {t: f"{_HIDE}{chr(0xE000 + k)}" for k, t in enumerate(texts)} if usable else {}
        self._unhide = {v: k for k, v in self._hide.items()}

    def _build(self, merges: list[str]) -> HFTokenizer:
        # every token keeps its own id; only NORMAL tokens are reachable through merges
        vocab = {t: i for i, t in enumerate(self.tokens)}
        pairs = [(a, b) for a, b in (m.split(" ", 1) for m in merges)]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
        hf.pre_tokenizer = pre_tokenizer(self.pre)
        hf.decoder = decoders.ByteLevel()
        user = [t for t, k in zip(self.tokens, self.token_types) if k == _USER_DEFINED]
        control = [t for t, k in zip(self.tokens, self.token_types) if k in (_CONTROL, _UNKNOWN)]
        hf.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        return hf

    # ---- construction ----

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> Tokenizer:
        """From GGUF `tokenizer.*` metadata as plain Python values."""
        model = md.get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in md:
            raise LiteError("the file has no tokenizer metadata (tokenizer.ggml.*); convert it with its tokenizer")
        if model != "gpt2":
            raise LiteError(f"unsupported tokenizer model {model!r}; lite reads byte-level BPE ('gpt2') only")
        template = md.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise LiteError("tokenizer.chat_template is not text; the GGUF file is damaged")
        try:
            return cls(
                md["tokenizer.ggml.tokens"],
                md.get("tokenizer.ggml.token_type"),
                md.get("tokenizer.ggml.merges", []),
                bos_id=md.get("tokenizer.ggml.bos_token_id"),
                eos_id=md.get("tokenizer.ggml.eos_token_id"),
                pad_id=md.get("tokenizer.ggml.padding_token_id"),
                # without the key llama.cpp adds a BOS for SentencePiece vocabularies only, not for BPE ("gpt2")
                add_bos_token=bool(md.get("tokenizer.ggml.add_bos_token", md.get("tokenizer.ggml.model") == "llama")),
                add_eos_token=bool(md.get("tokenizer.ggml.add_eos_token", False)),
                chat_template=template,
                pre=md.get("tokenizer.ggml.pre", "deepseek-llm"),
            )
        except LiteError:
            raise
        except Exception as e:  # tokenizers raises bare Exceptions and TypeErrors for a malformed vocabulary
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LiteError(f"the GGUF's tokenizer metadata is damaged ({reason}); convert the model again") from None

    @classmethod
    def from_gguf(cls, gguf_file: str | os.PathLike[str] | Any) -> Tokenizer:
        """From a GGUF file: a path, or an opened `quant.gguf_file.GGUFFile` (anything with `.metadata`)."""
        if not hasattr(gguf_file, "metadata"):
            from quant.gguf_file import GGUFFile

            gguf_file = GGUFFile(gguf_file)
        return cls.from_metadata(gguf_file.metadata)

    # ---- encode / decode ----

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def bos_token(self) -> str:
        return self.tokens[self.bos_id] if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.tokens[self.eos_id] if self.eos_id is not None else ""

    def encode(self, text: str, add_bos: bool | None = None, *, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. `add_bos` None follows the file's add_bos_token (as llama.cpp does); special
        token strings such as the EOS text are matched only with `parse_special=True`."""
        self._hf.encode_special_tokens = not parse_special  # True: special tokens are plain text
        if len(text) > 2 * _CHUNK_CHARS and self._cut_ok:  # encode pieces of a long text in parallel
            ids = [i for e in self._hf.encode_batch(_cut_after_newlines(text), add_special_tokens=False) for i in e.ids]
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_bos is None and self.add_eos_token and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], *, parse_special: bool = False) -> list[list[int]]:
        """Token ids of several texts (no BOS), encoded in parallel by `tokenizers`."""
        self._hf.encode_special_tokens = not parse_special
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes token `token_id` stands for, as llama.cpp's token_to_piece gives them."""
        if not 0 <= token_id < len(self.tokens):
            raise LiteError(f"token id {token_id} is outside the vocabulary of {len(self.tokens)}")
        kind = self.token_types[token_id]
        if kind in (_CONTROL, _UNKNOWN):
            return self.tokens[token_id].encode() if special else b""
        piece = self._pieces[token_id]
        if piece is None:
            text = self.tokens[token_id]
            if kind == _USER_DEFINED:
                piece = text.encode()
            elif kind == _NORMAL:
                dec = _BYTE_DECODER
                piece = b"".join(bytes([dec[c]]) if c in dec else c.encode() for c in text)
            elif kind == _BYTE and len(text) == 6 and text.startswith("<0x"):  # SentencePiece-style <0xAB>
                piece = bytes([int(text[3:5], 16)])
            else:  # UNUSED and other types produce no text
                piece = b""
            self._pieces[token_id] = piece
        return piece

    def decode(self, ids: list[int], special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. Control tokens (BOS, EOS) are shown only with
        `special=True`."""
        return b"".join(self.token_bytes(i, special) for i in ids).decode("utf-8", errors="replace")

    def stream(self, special: bool = False) -> StreamDecoder:
        """An incremental decoder: `.add(id)` returns only whole characters, `.flush()` the rest."""
        return StreamDecoder(self, special)

    # ---- chat ----

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Token ids of a conversation rendered with the file's chat template (or a built-in one), BOS once.

        Only the template's own special tokens become special ids: special-token text inside a message's
        content (a user typing "<｜end▁of▁sentence｜>") stays plain text. The content is marked before rendering
        with private-use stand-ins, so templates that transform it (trim, slicing) still render as usual.
        """
        pattern, hide, unhide = self._control_re, self._hide, self._unhide
        if pattern is None or any(_HIDE in str(m.get("content", "")) for m in messages):
            text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
            ids = self.encode(text, add_bos=False, parse_special=True)
        else:
            marked = []
            for m in messages:
                content = m.get("content")
                if isinstance(content, str):
                    m = {**m, "content": pattern.sub(lambda x: hide[x.group()], content)}
                marked.append(m)
            text = self.render_chat(marked, add_generation_prompt=add_generation_prompt, **extra)
            ids, start = [], 0
            for special in [*pattern.finditer(text), None]:  # the template's own special tokens split the text
                end = special.start() if special else len(text)
                plain = _HIDDEN.sub(lambda x: unhide.get(x.group(), x.group()), text[start:end])
                ids += self.encode(plain, add_bos=False)
                if special:
                    ids.append(self._control_ids[special.group()])
                    start = special.end()
        if self.bos_id is not None and self.add_bos_token and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The conversation as text, special tokens spelled out."""
        return render_chat_template(
            messages,
            self.chat_template or self._default_template,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


_CHUNK_CHARS = 1 << 15
_HIDE = "\ufdd0"  # a noncharacter: marks special-token text inside chat messages (see apply_chat_template)
_HIDDEN = re.compile(_HIDE + "[\ue000-\uf8ff]")


def _cut_after_newlines(text: str) -> list[str]:
    """`text` in pieces of at least _CHUNK_CHARS characters, each cut just after a newline."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + _CHUNK_CHARS)
        end = len(text) if cut < 0 else cut + 1
        pieces.append(text[start:end])
        start = end
    return pieces


class StreamDecoder:
    """Decodes ids one at a time; never returns part of a UTF-8 character (byte tokens are buffered)."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tok, self._special = tokenizer, special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id, self._special))

    def flush(self) -> str:
        """What is left (an unfinished character becomes U+FFFD); the decoder is ready for a new stream."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


_BYTE_DECODER = _byte_decoder()
