"""`lite convert`: a Hugging Face DeepSeek-V2 / V3-family checkpoint (FP8 too), or a deepseek2 GGUF, → GGUF.

- `writer.py`: `convert()`, streaming slices through the plan into a temporary file renamed on success;
- `plan.py`: the checkpoint's headers and every output tensor's type (no weight data read);
- `recipes.py`: the recipes (lite's, llama.cpp's mixes) and the type names `lite convert` offers;
- `names.py`: HF tensor names → llama.cpp's, and the tensor surgery between them;
- `sources.py`: slices of weights, and metadata, from safetensors or a GGUF;
- `fp8.py`: block-scaled FP8 dequantization; `hf_meta.py`: config.json → `deepseek2.*` keys;
- `tokenizer_meta.py`: an HF tokenizer → `tokenizer.*` keys; `tiktoken_vocab.py`: Kimi-K2's tiktoken.model → the same.

Conversion depends on the rest of lite (config, tokenizer, weights) and on quant, never the other way round.
The entry points load on first use, so that `cli/cmd_convert.py` can read the recipe tables while building the
parser without importing safetensors, tokenizers and the model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lite.convert.recipes import DEFAULT_RECIPE, OUTTYPES, RECIPES, TYPE_NAMES

if TYPE_CHECKING:
    from lite.convert.writer import ConvertProgress, ConvertSummary, convert

__all__ = ["convert", "ConvertProgress", "ConvertSummary", "RECIPES", "DEFAULT_RECIPE", "TYPE_NAMES", "OUTTYPES"]
_LAZY = ("convert", "ConvertProgress", "ConvertSummary")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lite.convert import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'lite.convert' has no attribute {name!r}")
