"""DeepSeek-V3-family routing (sigmoid gate, selection-only bias, noaux_tc groups, normalisation, scaling) against
transformers' DeepseekV3 (the reference), the unchanged V2 router, and the prefetch predictor."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from test_model import TOKENS, assert_parity, in_memory_model
from tiny_models import V3_CONFIGS, reference_logits

import lite
from lite.config import ARCH, ModelArgs
from lite.convert.hf_meta import add_metadata, gguf_metadata_from_hf
from lite.errors import LiteError
from lite.model import gate_scores, rms_norm, route, select_scores


def _args(**router) -> ModelArgs:
    base = dict(vocab_size=8, hidden_size=4, intermediate_size=8, moe_intermediate_size=4, num_hidden_layers=1)
    base |= dict(num_attention_heads=1, kv_lora_rank=4, q_lora_rank=None, qk_nope_head_dim=2, qk_rope_head_dim=2)
    base |= dict(v_head_dim=2, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=0, first_k_dense_replace=0)
    return ModelArgs(**{**base, **router})


@pytest.mark.parametrize("kind", list(V3_CONFIGS))
def test_router_matches_transformers(kind):
    """ids and weights of lite's router equal DeepseekV3TopkRouter's on 256 random tokens (biased, grouped)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = V3_CONFIGS[kind]
    ref = DeepseekV3TopkRouter(DeepseekV3Config(**cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(ref.weight.shape, generator=g) / 16)
        ref.e_score_correction_bias.copy_(0.1 * torch.randn(ref.e_score_correction_bias.shape, generator=g))
        x = torch.randn(256, cfg["hidden_size"], generator=g)
        _, want_w, want_ids = ref(x)
    args = ModelArgs.from_hf({**cfg, "architectures": ["DeepseekV3ForCausalLM"]})
    ids, weights = route(args, ref.weight.detach(), x, ref.e_score_correction_bias)
    order, want_order = ids.sort(dim=-1), want_ids.sort(dim=-1)  # transformers leaves the top-k unsorted
    assert torch.equal(order.values, want_order.values)
    torch.testing.assert_close(
        weights.gather(1, order.indices), want_w.gather(1, want_order.indices), rtol=1e-6, atol=0
    )
    ranked = gate_scores(args, ref.weight.detach(), x, ref.e_score_correction_bias)  # what the predictor ranks by
    assert torch.equal(ranked.topk(args.num_experts_per_tok).indices, ids)


def test_bias_selects_but_does_not_weight():
    router = torch.eye(8, 4)  # logits = x for experts 0-3, 0 for 4-7 (sigmoid 0.5)
    x = torch.tensor([[3.0, 1.0, 0.5, -1.0]])  # sigmoid: 0.95, 0.73, 0.62, 0.27
    bias = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0])  # lifts expert 2 (0.82) above expert 1
    plain = _args(scoring_func="sigmoid", topk_method="noaux_tc")
    ids, weights = route(plain, router, x, bias)
    assert ids.tolist() == [[0, 2]]
    assert torch.equal(weights, torch.sigmoid(torch.tensor([[3.0, 0.5]])))  # unbiased gate values, unnormalised
    assert route(plain, router, x)[0].tolist() == [[0, 1]]  # without the bias: the plain top-2
    normed = _args(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5)
    _, w = route(normed, router, x, bias)
    s = torch.sigmoid(torch.tensor([[3.0, 0.5]]))
    assert torch.equal(w, s / (s.sum(-1, keepdim=True) + 1e-20) * 2.5)


def test_noaux_tc_ranks_groups_by_top2_sum():
    """Group 0 holds the single best expert, group 1 the best pair: V3 keeps group 1, V2's rule group 0."""
    probs = torch.tensor([[0.90, 0.10, 0.10, 0.10, 0.60, 0.60, 0.10, 0.10]])  # 4 groups of 2 experts
    v3 = _args(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=1)
    v2 = _args(topk_method="group_limited_greedy", n_group=4, topk_group=1)
    assert select_scores(v3, probs).topk(2).indices.sort().values.tolist() == [[4, 5]]
    assert select_scores(v2, probs).topk(1).indices.tolist() == [[0]]
    assert torch.isinf(select_scores(v3, probs)[0, :4]).all()  # outside the kept groups: never chosen


def _v2_route_before_v3(args: ModelArgs, router: torch.Tensor, x: torch.Tensor):
    """lite's V2 router as it was before the V3 family (a verbatim copy), to hold the new one to it bit for bit."""
    scores = torch.softmax(x.float() @ router.T, dim=-1)
    if args.topk_method == "group_limited_greedy" and args.n_group > 1:
        groups = scores.view(scores.shape[0], args.n_group, -1)
        best = groups.amax(dim=-1).topk(args.topk_group, dim=-1).indices
        keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
        scores = groups.masked_fill(~keep[..., None], 0.0).flatten(1)
    weights, ids = scores.topk(args.num_experts_per_tok, dim=-1)
    if args.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * args.routed_scaling_factor


@pytest.mark.parametrize(
    "router",
    [
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0),
        dict(topk_method="greedy", norm_topk_prob=True),
        dict(topk_method="greedy"),
    ],
    ids=["v2", "plain", "lite"],
)
def test_v2_routing_is_unchanged(router):
    g = torch.Generator().manual_seed(1)
    args = _args(n_routed_experts=16, num_experts_per_tok=4, **router)
    w, x = torch.randn(16, 4, generator=g), torch.randn(500, 4, generator=g)
    for got, want in zip(route(args, w, x), _v2_route_before_v3(args, w, x)):
        assert torch.equal(got, want)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def test_parity_in_memory(hf_v3):
    ours, ref = in_memory_model(hf_v3).logits(TOKENS), reference_logits(hf_v3, TOKENS)
    print(f"{hf_v3.name}: in memory, max |err| / max |logit| = {_rel_err(ours, ref):.2e}")
    assert_parity(ours, ref)


def test_parity_converted_f32(hf_v3, tmp_path):
    from lite.convert import convert

    convert(hf_v3, tmp_path / "m.gguf", outtype="f32")
    ours, ref = lite.load(str(tmp_path / "m.gguf"), device="cpu").logits(TOKENS), reference_logits(hf_v3, TOKENS)
    print(f"{hf_v3.name}: f32 GGUF, max |err| / max |logit| = {_rel_err(ours, ref):.2e}")
    assert_parity(ours, ref)


def test_the_bias_matters(hf_v3):
    """Dropping the correction bias changes the choice of experts enough to fail parity: the tests can see it."""
    model = in_memory_model(hf_v3)
    for layer in model.transformer.weights.layers:
        if layer.router_bias is not None:
            layer.router_bias = torch.zeros_like(layer.router_bias)
    assert _rel_err(model.logits(TOKENS), reference_logits(hf_v3, TOKENS)) > 1e-3


def test_incremental_equals_full(hf_v3):
    model = in_memory_model(hf_v3)
    full = model.logits(TOKENS)
    session = model.session(32)
    steps = [session.feed(TOKENS[:5], all_logits=True)] + [session.feed([t])[None] for t in TOKENS[5:]]
    assert_parity(torch.cat(steps), full)


def test_predictor_ranks_experts_as_the_router_selects(hf_v3, monkeypatch):
    """The prefetch predictor's top-k is the router's selection (biased sigmoid inside the kept groups)."""
    import offload

    seen = {}
    real = offload.build_experts

    def spy(stacks, predict, *a, **kw):
        seen["predict"] = predict
        return real(stacks, predict, *a, **kw)

    monkeypatch.setattr(offload, "build_experts", spy)
    model = in_memory_model(hf_v3)
    args, layers = model.config, model.transformer.weights.layers
    h = torch.randn(64, args.hidden_size, generator=torch.Generator().manual_seed(2))
    k = args.num_experts_per_tok
    for i, w in enumerate(layers):
        predicted = seen["predict"](i, h, 2 * k)
        if w.router is None:
            assert predicted.shape == (64, 0)
            continue
        ids, _ = route(args, w.router, rms_norm(h, w.ffn_norm, args.rms_norm_eps), w.router_bias)
        assert torch.equal(predicted[:, :k].sort(-1).values, ids.sort(-1).values)
        assert w.router_bias is not None


def _write_meta(path, meta: dict) -> str:
    writer = gguf.GGUFWriter(str(path), ARCH)
    add_metadata(writer, meta)
    writer.add_tensor("token_embd.weight", torch.zeros(2, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_unknown_gating_func_is_refused(hf_v3, tmp_path):
    """A router variant lite does not know is refused in one line naming the key and value, never run as V2."""
    meta = gguf_metadata_from_hf(json.loads((hf_v3 / "config.json").read_text()))
    key = f"{ARCH}.expert_gating_func"
    assert meta[key] == 2 and ModelArgs.from_gguf(meta).scoring_func == "sigmoid"
    for value in (0, 3):
        with pytest.raises(LiteError, match=f"{key} = {value}") as e:
            ModelArgs.from_gguf({**meta, key: value})
        assert "\n" not in str(e.value)
    with pytest.raises(LiteError, match=f"{key} = 3"):
        lite.load(_write_meta(tmp_path / "m.gguf", {**meta, key: 3}), device="cpu")
    del meta[key]  # absent: llama.cpp's default for old V2 files, softmax
    assert ModelArgs.from_gguf(meta).scoring_func == "softmax"
