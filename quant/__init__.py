"""quant: GGUF files, GGML block formats and packed 4-bit matmuls. Knows nothing of any model."""

from quant.formats import bits_per_weight, can_quantize, dequantize, quantize
from quant.gguf_file import GGUFFile, TensorRef
from quant.qmatrix import QMatrix

__all__ = ["GGUFFile", "QMatrix", "TensorRef", "bits_per_weight", "can_quantize", "dequantize", "quantize"]
