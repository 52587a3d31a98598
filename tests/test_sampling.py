"""lite.sampling against explicit, hand-computed distributions."""

from __future__ import annotations

import math

import pytest
import torch

from lite.errors import LiteError
from lite.sampling import SEED_MAX, SamplingParams, apply_repeat_penalty, check, probabilities, sample

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


@pytest.mark.parametrize(
    "name, value, label, message",
    [
        ("temperature", float("inf"), "--temp", "--temp must be a finite number >= 0 (0 = greedy), got inf"),
        ("temperature", "nan", "temp", "temp must be a finite number >= 0 (0 = greedy), got 'nan'"),
        ("temperature", -0.1, None, "temperature must be a finite number >= 0 (0 = greedy), got -0.1"),
        ("repeat_penalty", 0.0, "--repeat-penalty", "--repeat-penalty must be a finite number > 0 (1 = off), got 0.0"),
        ("repeat_penalty", "1e999", "repeat_penalty", "must be a finite number > 0 (1 = off), got '1e999'"),
        ("seed", 2**64, "--seed", f"--seed must be a whole number from 0 to {SEED_MAX}, got {2**64}"),
        ("seed", -1, "--seed", f"--seed must be a whole number from 0 to {SEED_MAX}, got -1"),
        ("seed", "1.5", "seed", f"seed must be a whole number from 0 to {SEED_MAX}, got '1.5'"),
        ("top_k", -1, "--top-k", "--top-k must be a whole number >= 0 (0 = off), got -1"),
        ("top_k", 2.5, "top_k", "top_k must be a whole number >= 0 (0 = off), got 2.5"),
        ("top_p", 1.5, "--top-p", "--top-p must be a number from 0 to 1 (1 = off), got 1.5"),
        ("min_p", -0.01, "--min-p", "--min-p must be a number from 0 to 1 (0 = off), got -0.01"),
        ("max_tokens", 0, "-n/--max-tokens", "-n/--max-tokens must be a whole number >= 1, got 0"),
        ("top_k", True, "top_k", "top_k must be a whole number >= 0 (0 = off), got True"),
    ],
)
def test_check_rejects_with_the_given_name(name, value, label, message):
    with pytest.raises(LiteError) as e:
        check(name, value, label)
    assert str(e.value).endswith(message) and "\n" not in str(e.value)


def test_check_converts_and_params_validate_on_construction():
    assert check("seed", SEED_MAX) == SEED_MAX and check("seed", None) is None and check("seed", "7") == 7
    assert check("top_k", 5.0) == 5 and isinstance(check("top_k", 5.0), int)
    assert check("temperature", "0.25") == 0.25 and check("repeat_penalty", 1e-30) == 1e-30
    with pytest.raises(LiteError, match="^temperature must be a finite number"):
        SamplingParams(temperature=float("inf"))
    with pytest.raises(LiteError, match="^repeat_penalty must be"):
        SamplingParams(repeat_penalty=0)


EXTREMES = [
    dict(temperature=5e-324),  # the smallest float: greedy in effect
    dict(temperature=1e-30),
    dict(temperature=1e300),  # uniform over the kept tokens
    dict(repeat_penalty=1e-300),  # positive logits of seen tokens overflow: saturated, not inf
    dict(repeat_penalty=1e300),
    dict(repeat_penalty=1e-30, temperature=1e-30, top_k=3),
]


@pytest.mark.parametrize("extreme", EXTREMES)
def test_any_valid_option_samples_finitely(extreme):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=g) * 10
    logits[0], logits[1], logits[2] = 3e38, -3e38, float("-inf")  # extreme but legal logits
    history = [0, 1, 2, 3, 4]
    p = params(**extreme)
    probs = probabilities(logits, p, history)
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5 and float(probs[2]) == 0.0
    for _ in range(5):
        assert 0 <= sample(logits, p, history, g) < 64


def test_extreme_temperatures_mean_greedy_and_uniform():
    logits = logits_of(P4)
    assert close(probabilities(logits, params(temperature=1e-300)), [1, 0, 0, 0])
    assert close(probabilities(logits, params(temperature=1e300, top_k=2)), [0.5, 0.5, 0, 0])


def test_nan_logits_are_an_error_not_token_zero():
    logits = torch.full((8,), float("nan"))
    for p in (params(), params(temperature=0.0)):
        with pytest.raises(LiteError, match="NaN logits"):
            sample(logits, p)


def test_frequency_and_presence_penalties():
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    out = apply_repeat_penalty(logits, [0, 1, 0], penalty=1.0, last_n=64, frequency=0.5, presence=0.25)
    # llama.cpp: logit -= count * frequency + presence, for each token in the window
    assert torch.allclose(out, torch.tensor([2.0 - 2 * 0.5 - 0.25, 1.0 - 0.5 - 0.25, -1.0, 0.5]))
    out = apply_repeat_penalty(logits, [3, 0, 2], penalty=2.0, last_n=2, frequency=1.0)  # window: [0, 2]
    assert torch.allclose(out, torch.tensor([2.0 / 2 - 1.0, 1.0, -1.0 * 2 - 1.0, 0.5]))
    greedy = params(temperature=0.0, presence_penalty=1.5)
    assert sample(torch.tensor([2.0, 1.0]), greedy, history=[0]) == 1  # 2 - 1.5 < 1
