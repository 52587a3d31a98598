"""The pre-tokenizers lite knows (`tokenizer.ggml.pre`): llama.cpp's split rules as `tokenizers` pre-tokenizers.

Each is a sequence of isolating regex splits and then ByteLevel (GPT-2's byte-to-character map), so that the BPE
merges see exactly the pieces llama.cpp's `unicode_regex_split` makes.
"""

from __future__ import annotations

from tokenizers import Regex, pre_tokenizers

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM regexes, which are DeepSeek's HF `Split` pre-tokenizers.
# The character classes are kept as code-point ranges because several of their end points (Greek with oxia,
# OHM SIGN, KELVIN SIGN) have canonical equivalents; literal characters can be silently NFC-normalised by
# editors, which turns a range such as U+1F5F..U+1F7D into the empty U+1F5F..U+03CE.
# fmt: off
_CASED_LETTERS = (  # a subset of the cased letters (Lu, Ll, Lt), as listed by DeepSeek
    (0x0041, 0x005A), (0x0061, 0x007A), (0x00B5, 0x00B5), (0x00C0, 0x00D6), (0x00D8, 0x00F6), (0x00F8, 0x01BA),
    (0x01BC, 0x01BF), (0x01C4, 0x0293), (0x0295, 0x02AF), (0x0370, 0x0373), (0x0376, 0x0377), (0x037B, 0x037D),
    (0x037F, 0x037F), (0x0386, 0x0386), (0x0388, 0x038A), (0x038C, 0x038C), (0x038E, 0x03A1), (0x03A3, 0x03F5),
    (0x03F7, 0x0481), (0x048A, 0x052F), (0x0531, 0x0556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD),
    (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15),
    (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B),
    (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4),
    (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC),
    (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124),
    (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F),
    (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE),
    (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E),
    (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F),
    (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF),
    (0x1E900, 0x1E943),
)
# fmt: on
_PUNCTUATION = ((0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F), (0x3000, 0x3002))
_CJK_HANGUL = ((0x4E00, 0x9FA5), (0x0800, 0x4E00), (0xAC00, 0xD7FF))


def _char_class(ranges: tuple[tuple[int, int], ...]) -> str:
    def char(cp: int) -> str:
        c = chr(cp)
        return "\\" + c if c in "\\]-[^" else c

    return "[" + "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in ranges) + "]"


_LETTERS, _PUNCT, _CJK = _char_class(_CASED_LETTERS), _char_class(_PUNCTUATION), _char_class(_CJK_HANGUL)

DEEPSEEK_LLM_SPLITS = ("[\r\n]", f"\\s?{_LETTERS}+", f"\\s?{_PUNCT}+", "\\s+$", f"{_CJK}+", "\\p{N}+")

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM regexes (`tokenizer.ggml.pre` "deepseek-v3": DeepSeek-V3/R1 and the
# models that reuse their tokenizer): digits in runs of up to three, CJK ideographs and kana, then one GPT-4-like rule.
DEEPSEEK_V3_SPLITS = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)

# The same rules in four passes instead of six (each pass costs about as much as the whole BPE). Merging is
# exact here: pass 1 isolates single newline characters, and at a newline the first alternative wins, so
# "[\r\n]|\s?L+" finds the same pieces as the two passes. Passes 5 and 6 only cut where membership of C (CJK)
# or N (numbers) changes, so together they split runs of C-and-N, C-not-N and N-not-C chars, which one pass
# does. test_tokenizer.py checks both forms agree on a fuzzed alphabet of the awkward characters.
_FUSED_SPLITS = (
    f"[\r\n]|\\s?{_LETTERS}+",
    DEEPSEEK_LLM_SPLITS[2],
    DEEPSEEK_LLM_SPLITS[3],
    f"(?:(?=\\p{{N}}){_CJK})+|(?:(?!\\p{{N}}){_CJK})+|(?:(?!{_CJK})\\p{{N}})+",
)


def deepseek_llm_pre_tokenizer(fused: bool = True) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's `deepseek-llm` pre-tokenizer: isolating regex splits in order, then ByteLevel.

    Each split cuts every piece from the previous one into matches and the stretches between them (both kept),
    exactly as llama.cpp's `unicode_regex_split` applies its list of regexes. `fused=False` gives the six
    splits as DeepSeek's tokenizer.json lists them; the default fuses them into four equivalent, faster passes.
    """
    patterns = _FUSED_SPLITS if fused else DEEPSEEK_LLM_SPLITS
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level])


# llama.cpp's LLAMA_VOCAB_PRE_TYPE_KIMI_K2 (`tokenizer.ggml.pre` "kimi-k2": Kimi-K2's tiktoken vocabulary). llama.cpp
# does not run Moonshot's regex: it names one pattern, "\p{Han}+", that selects a hand-written splitter in unicode.cpp,
# and that splitter is the reference here. It differs from Moonshot's pattern in what it takes for Han and for letters:
# - Han is llama.cpp's list of code-point blocks below (CJK ideographs, extensions A-F, compatibility ideographs),
#   not the Unicode Han script: U+3005 々 and U+3007 〇 are a letter and a number, radicals (U+2E80..) symbols;
# - a word is one run of any non-Han letters (\p{L}), with no split between cases ("getUserName" is one piece),
#   and combining marks are not letters: a mark goes with punctuation, or leads the next word as punctuation can.
# Contractions after a word match in either case ("DON'T" keeps "'T"), as in Moonshot's pattern.
_HAN = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0x2F800, 0x2FA1F),
)  # fmt: skip
_HAN_CLASS = _char_class(_HAN)
_NON_HAN_LETTER = f"[\\p{{L}}&&[^{_HAN_CLASS[1:-1]}]]"
_ANY_CASE_CONTRACTION = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
KIMI_K2_SPLITS = (
    f"{_HAN_CLASS}+|[^\r\n\\p{{L}}\\p{{N}}]?{_NON_HAN_LETTER}+{_ANY_CASE_CONTRACTION}|\\p{{N}}{{1,3}}"
    "| ?[^\\s\\p{L}\\p{N}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)

_SPLITS = {"deepseek-v3": DEEPSEEK_V3_SPLITS, "kimi-k2": KIMI_K2_SPLITS}
PRE_TYPES = ("deepseek-llm", *_SPLITS)


def pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre` (the ones lite knows: PRE_TYPES)."""
    if pre == "deepseek-llm":
        return deepseek_llm_pre_tokenizer()
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _SPLITS[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
