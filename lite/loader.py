"""GGUF → `Model`: `lite.load(path, device="auto", dtype=None, **offload_options)`."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gguf
import torch

from lite.cache import default_cache_dtype, is_quantized
from lite.config import ModelArgs, check_tensor_layers
from lite.errors import LiteError
from lite.generate import Session, generate
from lite.model import Transformer, gate_scores, rms_norm
from lite.weights import load_weights
from offload.sizes import DEFAULT_CTX  # a session's default capacity (the model may allow far more)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LiteError("device='cuda' but no CUDA device is available; use device='cpu' or 'auto'")
    if device.type not in ("cpu", "cuda"):
        raise LiteError(f"unsupported device {str(device)!r}; use 'auto', 'cpu' or 'cuda'")
    return device


class Model:
    """A loaded DeepSeek-V2/V3-family model. See docs/DESIGN.md for the public contract."""

    def __init__(
        self,
        args: ModelArgs,
        tensors: Mapping[str, Any],
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
        cache_dtype: torch.dtype | None = None,
        **options: Any,
    ):
        import offload

        self.config = args
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.cache_dtype = cache_dtype or default_cache_dtype(self.device, self.dtype, is_quantized(tensors))
        options.setdefault("cache_dtype_bytes", self.cache_dtype.itemsize)  # the planner counts the same cache
        self.metadata = dict(metadata or {})
        self.tokenizer = tokenizer
        weights, stacks = load_weights(args, tensors, self.device, self.dtype)

        def predict(layer: int, h: torch.Tensor, width: int) -> torch.Tensor:
            """That layer's ffn_norm + gate applied to an earlier residual h [T, hidden] -> the `width` likeliest
            expert ids per token [T, width], likeliest first: ranked exactly as the router selects (V3: the biased
            sigmoid scores inside the kept groups)."""
            w = weights.layers[layer]
            if w.router is None:  # a dense layer routes nothing
                return torch.empty(h.shape[0], 0, dtype=torch.long, device=h.device)
            scores = gate_scores(args, w.router, rms_norm(h, w.ffn_norm, args.rms_norm_eps), w.router_bias)  # [T, E]
            return scores.topk(min(width, scores.shape[-1]), dim=-1).indices

        self.experts = offload.build_experts(stacks, predict, self.device, self.dtype, **options)
        self.transformer = Transformer(args, weights, self.experts, self.device, self.dtype)
        eos = self.metadata.get("tokenizer.ggml.eos_token_id")
        if eos is None and tokenizer is not None:
            eos = getattr(tokenizer, "eos_id", None)
        self.eos_token_id: int | None = eos
        self.max_context = args.max_position_embeddings

    def session(self, ctx: int | None = None) -> Session:
        """A conversation in one latent cache of `ctx` tokens (default min(DEFAULT_CTX = 4096, the model's))."""
        ctx = ctx or min(DEFAULT_CTX, self.max_context)
        if not 0 < ctx <= self.max_context:
            raise LiteError(f"ctx={ctx} is out of range; this model allows 1..{self.max_context} tokens")
        return Session(self, ctx)

    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """float32 [len(tokens), vocab] on the CPU: a full causal forward from an empty cache."""
        tokens = list(tokens)
        if not tokens:
            raise LiteError("logits needs at least one token id")
        if len(tokens) > self.max_context:
            raise LiteError(f"{len(tokens)} tokens exceed the model's context of {self.max_context}")
        return self.session(len(tokens)).feed(tokens, all_logits=True).cpu()

    def generate(self, tokens: Sequence[int], **kwargs: Any) -> Iterator[int]:
        """Stream sampled token ids; keywords as `lite.generate.generate` (SamplingParams names, seed, stop...)."""
        return generate(self, tokens, **kwargs)

    def stats(self) -> dict:
        return self.experts.stats()

    def reset_stats(self) -> None:
        self.experts.reset_stats()

    def __repr__(self) -> str:
        a = self.config
        return (
            f"Model({a.num_hidden_layers} layers, hidden {a.hidden_size}, {a.n_routed_experts} experts "
            f"top-{a.num_experts_per_tok}, device={self.device}, dtype={self.dtype})"
        )


def _load_tokenizer(gguf_file) -> Any:
    if "tokenizer.ggml.tokens" not in gguf_file.metadata:
        return None
    from lite.tokenizer import Tokenizer  # part of lite: an ImportError here is a broken install, not "no tokenizer"

    return Tokenizer.from_gguf(gguf_file)


def _expand_other_types(f: Any, device: str, dtype: torch.dtype | None) -> None:
    """Types lite has no kernels for but gguf-py reads (IQ2_XXS, IQ3_S, TQ1_0, ...): dequantized once, here, to the
    compute dtype's float type (F32 keeps a float32 model exact, BF16 halves the memory), with one notice. Not on
    the device-kernel path (CUDA, LITE_DEVICE_KERNELS=triton): there a type the kernels lack is refused by name,
    never silently expanded (see weights.load_weights)."""
    from quant.formats import expand_other_types
    from quant.qmatrix import device_kernels_forced

    if resolve_device(device).type == "cuda" or device_kernels_forced():
        return
    compute = dtype or torch.float32
    to = gguf.GGMLQuantizationType.F32 if compute == torch.float32 else gguf.GGMLQuantizationType.BF16
    found = expand_other_types(f.tensors, to)
    if found:
        names = ", ".join(q.name for q in found)
        warnings.warn(
            f"{f.path}: tensor type{'s' if len(found) > 1 else ''} {names} dequantized to {to.name} once at load: "
            "more memory, and slower than the types lite multiplies natively",
            stacklevel=3,
        )


def load(
    path: str,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    cache_dtype: torch.dtype | None = None,
    **options: Any,
) -> Model:
    """Load a DeepSeek-V2/V3-family GGUF (ours or llama.cpp's, split k_b/v_b or legacy kv_b).

    device: "auto" | "cpu" | "cuda"; dtype: compute dtype (default bf16 on CUDA, float32 on CPU);
    cache_dtype: latent cache dtype (default bf16 on CUDA; on the CPU bf16 for quantized weights where the CPU has
    bf16 instructions, else the compute dtype: `lite.cache.default_cache_dtype`); options go to `offload.build_experts`
    (gpu_memory, ram_memory, experts_on, expert_cache, prefetch, miss_policy).
    """
    from quant.finite import check_finite
    from quant.gguf_file import GGUFFile

    f = GGUFFile(path)  # raises LiteError for a missing, truncated or garbled file
    check_finite(f.tensors, f.path)  # NaN/Inf in a weight: small tensors in full, large ones sampled
    _expand_other_types(f, device, dtype)
    args = ModelArgs.from_gguf(f.metadata)  # checks the metadata's types, ranges and agreement
    check_tensor_layers(args, f.tensors)
    return Model(
        args,
        f.tensors,
        device=device,
        dtype=dtype,
        metadata=f.metadata,
        tokenizer=_load_tokenizer(f),
        cache_dtype=cache_dtype,
        **{"gguf_file": f, **options},  # lets the offload planner count dense weights and the latent cache
    )
