"""The model against transformers (the reference): parity, incremental decoding, sessions, greedy generation."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hf_helpers import merge_kv_b, tensors_from_hf

import lite
from lite.config import ARCH, ModelArgs
from lite.convert.hf_meta import add_metadata, gguf_metadata_from_hf
from lite.errors import LiteError
from lite.loader import Model
from quant.gguf_file import TensorRef

TOKENS = [0, 17, 200, 45, 9, 300, 511, 2, 77, 150, 33, 64, 480, 5, 260, 99]


@functools.cache
def _reference(ckpt: Path, tokens: tuple[int, ...]) -> torch.Tensor:
    return _reference_uncached(ckpt, list(tokens))


def reference_logits(ckpt: Path, tokens: list[int]) -> torch.Tensor:
    return _reference(ckpt, tuple(tokens)).clone()


def _reference_uncached(ckpt: Path, tokens: list[int]) -> torch.Tensor:
    """transformers' logits, with top-k renormalisation where config.json asks for it.

    transformers 5 drops `norm_topk_prob` from DeepseekV2 (it never renormalises); DeepSeek's own modeling code
    and llama.cpp divide the top-k weights by their sum when it is true, and so does lite.
    """
    from tiny_models import reference_logits as plain_reference
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    if not json.loads((ckpt / "config.json").read_text()).get("norm_topk_prob"):
        return plain_reference(ckpt, tokens)
    forward = m.DeepseekV2TopkRouter.forward

    def normalised(self, hidden_states):
        logits, weights, ids = forward(self, hidden_states)
        weights = weights / self.routed_scaling_factor
        return logits, weights / weights.sum(-1, keepdim=True) * self.routed_scaling_factor, ids

    m.DeepseekV2TopkRouter.forward = normalised
    try:
        return plain_reference(ckpt, tokens)
    finally:
        m.DeepseekV2TopkRouter.forward = forward


def assert_parity(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err <= tol, f"max |err| / max |logit| = {err:.2e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def in_memory_model(ckpt: Path, legacy_kv_b: bool = False) -> Model:
    args = ModelArgs.from_hf(json.loads((ckpt / "config.json").read_text()))
    tensors = tensors_from_hf(ckpt, args)
    if legacy_kv_b:  # the older llama.cpp layout: one attn_kv_b per layer
        for i in range(args.num_hidden_layers):
            k_b, v_b = (_as_tensor(tensors.pop(f"blk.{i}.attn_{x}.weight")) for x in ("k_b", "v_b"))
            tensors[f"blk.{i}.attn_kv_b.weight"] = _as_ref(f"blk.{i}.attn_kv_b.weight", merge_kv_b(k_b, v_b))
    return Model(args, tensors, device="cpu")


def _as_tensor(ref: TensorRef) -> torch.Tensor:
    return torch.from_numpy(ref.data.view(np.float32).reshape(ref.shape).copy())


def _as_ref(name: str, t: torch.Tensor) -> TensorRef:
    raw = np.ascontiguousarray(t.numpy(), dtype=np.float32).reshape(-1).view(np.uint8)
    return TensorRef(name, gguf.GGMLQuantizationType.F32, tuple(t.shape), raw, 0)


def write_f32_gguf(ckpt: Path, out: Path) -> Path:
    """An f32 GGUF with llama.cpp names and metadata, written straight from the name mapping (no converter)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), ARCH)
    add_metadata(writer, gguf_metadata_from_hf(cfg))
    for name, ref in tensors_from_hf(ckpt, ModelArgs.from_hf(cfg)).items():
        writer.add_tensor(name, ref.data.view(np.float32).reshape(ref.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def lite_model(hf_lite) -> Model:
    return in_memory_model(hf_lite)


def test_parity_in_memory(hf_checkpoint):
    assert_parity(in_memory_model(hf_checkpoint).logits(TOKENS), reference_logits(hf_checkpoint, TOKENS))


def test_parity_through_gguf_file(hf_lite, tmp_path):
    """lite.load on a GGUF written straight from the name mapping (independent of the converter)."""
    model = lite.load(str(write_f32_gguf(hf_lite, tmp_path / "m.gguf")), device="cpu")
    assert model.tokenizer is None
    assert_parity(model.logits(TOKENS), reference_logits(hf_lite, TOKENS))


def test_parity_converted(hf_checkpoint, tmp_path):
    import lite.convert.writer as convert

    out = tmp_path / "conv.gguf"
    convert.convert(hf_checkpoint, out, outtype="f32")
    assert_parity(lite.load(str(out), device="cpu").logits(TOKENS), reference_logits(hf_checkpoint, TOKENS))


def test_legacy_kv_b_layout(hf_lite):
    assert_parity(in_memory_model(hf_lite, legacy_kv_b=True).logits(TOKENS), reference_logits(hf_lite, TOKENS))


def test_incremental_equals_full(hf_checkpoint):
    model = in_memory_model(hf_checkpoint)
    full = model.logits(TOKENS)
    session = model.session(32)
    steps = [session.feed(TOKENS[:5], all_logits=True)] + [session.feed([t])[None] for t in TOKENS[5:]]
    assert session.tokens == TOKENS
    assert_parity(torch.cat(steps), full)


def test_chunked_prefill_equals_full(lite_model, monkeypatch):
    import lite.generate
    import lite.model

    full = lite_model.logits(TOKENS)
    monkeypatch.setattr(lite.generate, "PREFILL_CHUNK", 3)
    monkeypatch.setattr(lite.generate, "MAX_PREFILL_CHUNK", 3)
    assert_parity(lite_model.session(32).feed(TOKENS, all_logits=True), full)
    assert_parity(lite_model.session(32).feed(TOKENS)[None], full[-1:])
    monkeypatch.setattr(lite.model, "SCORE_BUDGET", 100)  # blocks of a few queries over the cache
    assert_parity(lite_model.session(32).feed(TOKENS, all_logits=True), full)


def test_session_rewind_and_limits(lite_model):
    a, b, c = TOKENS[:6], TOKENS[6:10], [7, 8, 9]
    session = lite_model.session(12)
    session.feed(a + b)
    session.rewind(len(a))
    assert session.tokens == a
    assert_parity(session.feed(c)[None], lite_model.logits(a + c)[-1:])
    with pytest.raises(LiteError, match="context full"):
        session.feed(list(range(4)))
    with pytest.raises(LiteError, match="rewind"):
        session.rewind(100)
    session.reset()
    assert session.tokens == []
    with pytest.raises(LiteError, match="out of range"):
        session.feed([lite_model.config.vocab_size])


def test_greedy_generate_matches_transformers(hf_lite, lite_model):
    from transformers import DeepseekV2ForCausalLM

    ref = DeepseekV2ForCausalLM.from_pretrained(str(hf_lite), dtype=torch.float32).eval()
    prompt, expected = TOKENS[:6], []
    with torch.no_grad():
        for _ in range(6):
            expected.append(int(ref(torch.tensor([prompt + expected])).logits[0, -1].argmax()))
    lite_model.eos_token_id = None
    assert list(lite_model.generate(prompt, max_tokens=6, temperature=0.0)) == expected


def test_sampled_generate_is_reproducible(lite_model):
    lite_model.eos_token_id = None
    run = [list(lite_model.generate(TOKENS[:4], max_tokens=8, temperature=1.0, seed=s)) for s in (5, 5, 6)]
    assert run[0] == run[1] and len(run[0]) == 8
    assert run[0] != run[2]
    first = run[0][0]
    lite_model.eos_token_id = first
    assert list(lite_model.generate(TOKENS[:4], max_tokens=8, temperature=1.0, seed=5)) == []
    lite_model.eos_token_id = None


def test_generate_continues_a_session(lite_model):
    lite_model.eos_token_id = None
    session = lite_model.session(40)
    first = list(lite_model.generate(TOKENS[:4], max_tokens=5, temperature=0.0, session=session))
    assert session.tokens == TOKENS[:4] + first[:-1]
    prompt = TOKENS[:4] + first + [3]
    again = list(lite_model.generate(prompt, max_tokens=5, temperature=0.0, session=session))
    assert again == list(lite_model.generate(prompt, max_tokens=5, temperature=0.0))


def test_resident_experts_equal_per_token_sum():
    from offload import ExpertStacks
    from offload.resident import ResidentExperts

    g = torch.Generator().manual_seed(0)
    E, d, ff, T, k = 6, 32, 64, 9, 2
    w = {n: torch.randn(E, *s, generator=g) / 8 for n, s in (("gate", (ff, d)), ("up", (ff, d)), ("down", (d, ff)))}
    stacks = ExpertStacks(*(_as_ref(n, w[n]) for n in ("gate", "up", "down")))
    experts = ResidentExperts({1: stacks}, "cpu", torch.float32)
    x = torch.randn(T, d, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    expected = torch.zeros(T, d)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            hidden = torch.nn.functional.silu(x[t] @ w["gate"][e].T) * (x[t] @ w["up"][e].T)
            expected[t] += weights[t, j] * (hidden @ w["down"][e].T)
    torch.testing.assert_close(experts(1, x, ids, weights), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(experts(1, x[:1], ids[:1], weights[:1]), expected[:1], rtol=1e-5, atol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(LiteError, match="not found"):
        lite.load(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(LiteError):
        lite.load(str(bad))
    other = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(other), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LiteError, match="architecture"):
        lite.load(str(other))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_parity_and_incremental(hf_checkpoint, tmp_path):
    """float32 on CUDA is exact; bf16 (the CUDA default) is close: a bf16 rounding can flip a routing choice of
    these random tiny models, so it is held to a mean cosine similarity rather than an elementwise bound."""
    path = str(write_f32_gguf(hf_checkpoint, tmp_path / "m.gguf"))
    ref = reference_logits(hf_checkpoint, TOKENS)
    model = lite.load(path, device="cuda", dtype=torch.float32)
    assert model.device.type == "cuda"
    full = model.logits(TOKENS)
    assert_parity(full, ref)
    session = model.session(32)
    steps = [session.feed(TOKENS[:5], all_logits=True)] + [session.feed([t])[None] for t in TOKENS[5:]]
    assert_parity(torch.cat(steps).cpu(), full)

    bf16 = lite.load(path, device="cuda")
    assert bf16.dtype == torch.bfloat16 and bf16.cache_dtype == torch.bfloat16
    session = bf16.session(32)
    steps = [session.feed(TOKENS[:5], all_logits=True)] + [session.feed([t])[None] for t in TOKENS[5:]]
    for logits in (bf16.logits(TOKENS), torch.cat(steps).float().cpu()):
        cos = torch.nn.functional.cosine_similarity(logits, ref, dim=-1)
        assert float(cos.mean()) >= 0.98, cos
    bf16.eos_token_id = None
    assert len(list(bf16.generate(TOKENS[:4], max_tokens=4, temperature=0.8, seed=1))) == 4


def test_load_converted_with_tokenizer(tmp_path_factory):
    from cli_models import tiny_chat_model

    path, hf = tiny_chat_model(tmp_path_factory.mktemp("with_tokenizer"))
    model = lite.load(str(path), device="cpu")
    assert model.tokenizer is not None
    assert model.eos_token_id == model.tokenizer.eos_id is not None
    tokens = model.tokenizer.encode("hello world")
    assert_parity(model.logits(tokens), reference_logits(hf, tokens))


@pytest.mark.parametrize("start", [0, 37])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared-latent", "per-head"])
def test_attend_blocks_match_causal_softmax(start, per_head, monkeypatch):
    """Query blocks that skip the rows none of their queries may see compute the causal softmax attention of
    every query over every cached row (float64 reference, fresh random data), for keys/values shared by the heads
    (the latent rows) and per head (expanded)."""
    import lite.model

    H, T, dk, dv = 3, 300, 24, 16
    query = torch.randn(H, T, dk)
    if per_head:
        keys, values = torch.randn(H, start + T, dk), torch.randn(H, start + T, dv)
    else:
        kv = torch.randn(start + T, dk)
        keys, values = kv, kv[:, :dv]
    scores = torch.einsum("htd,hsd->hts" if per_head else "htd,sd->hts", query.double(), keys.double())
    future = torch.arange(start + T)[None, :] > (start + torch.arange(T))[:, None]
    ref = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ values.double()
    for block in (lite.model.CAUSAL_BLOCK, 7, 1):
        monkeypatch.setattr(lite.model, "CAUSAL_BLOCK", block)
        out = lite.model.attend(query, keys, values, start)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_expanded_and_absorbed_attention_agree(lite_model, monkeypatch):
    """A prompt attends with the latent rows expanded into per-head keys and values (transformers' form), decode
    with W_UK/W_UV absorbed (MLA's); forcing either for every step gives the same logits, both at parity."""
    import lite.model

    assert lite.model.expand_heads(lite_model.config, 512, 0)
    assert not lite.model.expand_heads(lite_model.config, 1, 100)
    monkeypatch.setattr(lite.model, "EXPAND_BUDGET", 10**4)  # the expanded rows would not fit: latent rows
    assert not lite.model.expand_heads(lite_model.config, 512, 0)
    monkeypatch.undo()
    full = lite_model.logits(TOKENS)
    for forced in (True, False):
        monkeypatch.setattr(lite.model, "expand_heads", lambda args, T, start, forced=forced: forced)
        assert_parity(lite_model.logits(TOKENS), full)
        session = lite_model.session(32)
        session.feed(TOKENS[:5])
        assert_parity(session.feed(TOKENS[5:], all_logits=True), full[5:])


def test_default_cache_dtype_follows_the_weights_and_the_cpu(hf_lite, tiny_q4_gguf, tmp_path):
    """An f32 GGUF keeps a float32 latent cache (exact); a quantized one gets bf16 where the CPU multiplies bf16
    natively (attention at matrix speed, half the memory), float32 elsewhere; CUDA is always bf16."""
    from lite.cache import default_cache_dtype

    bf16_native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert default_cache_dtype("cuda") == torch.bfloat16
    assert default_cache_dtype("cpu", torch.float32, quantized=False) == torch.float32
    assert default_cache_dtype("cpu", torch.float32, quantized=True) == (
        torch.bfloat16 if bf16_native else torch.float32
    )
    f32 = lite.load(str(write_f32_gguf(hf_lite, tmp_path / "f32.gguf")), device="cpu")
    assert f32.cache_dtype == torch.float32 and f32.session(8).cache.dtype == torch.float32
    q4 = lite.load(str(tiny_q4_gguf), device="cpu")
    assert q4.session(8).cache.dtype == default_cache_dtype("cpu", torch.float32, quantized=True)
    assert lite.load(str(tiny_q4_gguf), device="cpu", cache_dtype=torch.float32).cache_dtype == torch.float32
