"""lite.sampling against explicit, hand-computed distributions."""

from __future__ import annotations

import math

import pytest
import torch

from lite.sampling import SamplingParams, apply_repeat_penalty, probabilities, sample

P4 = [0.5, 0.3, 0.15, 0.05]  # a distribution whose filtered versions are easy to write down


def logits_of(p: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(x) for x in p], dtype=torch.float32)


def params(**kw) -> SamplingParams:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    return SamplingParams(**{**base, **kw})


def close(a: torch.Tensor, b: list[float]) -> bool:
    return torch.allclose(a, torch.tensor(b, dtype=torch.float32), atol=1e-6)


def test_no_filters_is_softmax():
    assert close(probabilities(logits_of(P4), params()), P4)


def test_top_k():
    assert close(probabilities(logits_of(P4), params(top_k=2)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert close(probabilities(logits_of(P4), params(top_k=1)), [1, 0, 0, 0])


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.5, [1, 0, 0, 0]),  # the first token alone reaches 0.5
        (0.8, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
        (0.81, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),  # smallest prefix reaching p includes the crossing token
        (0.1, [1, 0, 0, 0]),  # always at least one token
    ],
)
def test_top_p(top_p, expected):
    assert close(probabilities(logits_of(P4), params(top_p=top_p)), expected)


def test_min_p():
    # threshold 0.35 * 0.5 = 0.175 keeps 0.5 and 0.3
    assert close(probabilities(logits_of(P4), params(min_p=0.35)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    # threshold 0.29 * 0.5 = 0.145 also keeps 0.15
    assert close(probabilities(logits_of(P4), params(min_p=0.29)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])


def test_temperature_is_applied_last():
    # p_i^(1/T) renormalised over the kept set; top_p=0.8 keeps two tokens whatever the temperature
    for t in (0.5, 2.0):
        w = [0.5 ** (1 / t), 0.3 ** (1 / t)]
        expected = [w[0] / sum(w), w[1] / sum(w), 0, 0]
        assert close(probabilities(logits_of(P4), params(top_p=0.8, temperature=t)), expected)


def test_filters_compose_in_order():
    # top-k 3 leaves [0.5, 0.3, 0.15]/0.95; top-p 0.6 on that keeps 0.526 + 0.316 = 0.842 (two tokens)
    assert close(probabilities(logits_of(P4), params(top_k=3, top_p=0.6)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])


def test_repeat_penalty_explicit():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repeat_penalty(logits, [0, 1, 0], penalty=2.0, last_n=64)
    assert torch.equal(out, torch.tensor([1.0, -2.0, 0.5, 3.0]))
    out = apply_repeat_penalty(logits, [3, 0, 1], penalty=2.0, last_n=2)  # only the last two count
    assert torch.equal(out, torch.tensor([1.0, -2.0, 0.5, 3.0]))
    assert torch.equal(apply_repeat_penalty(logits, [3], penalty=1.0, last_n=64), logits)
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0]))  # input untouched


def test_repeat_penalty_changes_distribution():
    # logits log(P4); token 0 seen: its logit log(0.5) < 0 is multiplied by 2 -> weight 0.25
    p = probabilities(logits_of(P4), params(repeat_penalty=2.0), history=[0])
    w = [0.25, 0.3, 0.15, 0.05]
    assert close(p, [x / sum(w) for x in w])


def test_greedy():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, params(temperature=0.0)) == 1
    assert sample(logits, params(temperature=0.0, repeat_penalty=1.5), history=[1]) == 2  # 3.0/1.5 < 2.9
    assert close(probabilities(logits, params(temperature=0.0)), [0, 1, 0, 0])


def test_sample_frequencies_match_distribution():
    logits = logits_of(P4)
    p = params(top_p=0.81, temperature=1.5)
    expected = probabilities(logits, p)
    g = torch.Generator().manual_seed(1234)
    n = 8000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[sample(logits, p, generator=g)] += 1
    assert counts[3] == 0  # filtered token never drawn
    freq = counts / n
    # binomial standard error <= 0.0056 at n=8000; 5 sigma
    assert torch.all((freq - expected).abs() < 0.028), (freq, expected)


def test_same_seed_same_draws():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    p = params(temperature=1.0, top_k=50)

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, p, generator=g) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_frequency_and_presence_penalties():
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    out = apply_repeat_penalty(logits, [0, 1, 0], penalty=1.0, last_n=64, frequency=0.5, presence=0.25)
    # llama.cpp: logit -= count * frequency + presence, for each token in the window
    assert torch.allclose(out, torch.tensor([2.0 - 2 * 0.5 - 0.25, 1.0 - 0.5 - 0.25, -1.0, 0.5]))
    out = apply_repeat_penalty(logits, [3, 0, 2], penalty=2.0, last_n=2, frequency=1.0)  # window: [0, 2]
    assert torch.allclose(out, torch.tensor([2.0 / 2 - 1.0, 1.0, -1.0 * 2 - 1.0, 0.5]))
    greedy = params(temperature=0.0, presence_penalty=1.5)
    assert sample(torch.tensor([2.0, 1.0]), greedy, history=[0]) == 1  # 2 - 1.5 < 1
