"""Drift arithmetic and settings against hand-computed values, field by field."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench.metrics.drift import (  # noqa: E402
    DriftBudget,
    DriftConfig,
    gen_prompt_offsets,
    generation_agreement,
    summarize_drift,
    token_drift,
    token_windows,
)
from optimize.errors import InputError  # noqa: E402


def test_summarize_drift_every_field_by_hand():
    kld = [0.0, 0.1, 0.2, 0.3, 0.4]
    nll_ref = [1.0, 1.0, 2.0, 2.0, 3.0]
    nll_var = [1.5, 1.0, 2.0, 3.0, 3.0]
    top1 = [1.0, 1.0, 0.0, 1.0, 1.0]
    delta_p = [-0.2, 0.0, 0.1, -0.1, 0.2]
    m = summarize_drift({"kld": kld, "nll_ref": nll_ref, "nll_var": nll_var, "top1": top1, "delta_p": delta_p})
    mean_var, mean_ref = 10.5 / 5, 9.0 / 5
    ln = [0.5, 0.0, 0.0, 1.0, 0.0]  # nll_var - nll_ref; mean 0.3
    sd_ln = math.sqrt(sum((x - 0.3) ** 2 for x in ln) / 4)
    sd_var = math.sqrt(sum((x - mean_var) ** 2 for x in nll_var) / 4)
    sd_kld = math.sqrt(sum((x - 0.2) ** 2 for x in kld) / 4)
    expected = {
        "perplexity": math.exp(mean_var),
        "perplexity_stderr": math.exp(mean_var) * sd_var / math.sqrt(5),
        "reference_perplexity": math.exp(mean_ref),
        "ppl_ratio": math.exp(0.3),
        "ln_ppl_ratio": 0.3,
        "ln_ppl_ratio_stderr": sd_ln / math.sqrt(5),
        "kld_mean": 0.2,
        "kld_mean_stderr": sd_kld / math.sqrt(5),
        "kld_median": 0.2,
        "kld_p90": 0.36,  # linear interpolation: 0.3 + 0.6 x 0.1
        "kld_p95": 0.38,
        "kld_p99": 0.396,
        "kld_p999": 0.3996,
        "kld_min": 0.0,
        "kld_max": 0.4,
        "top1_agreement": 0.8,
        "top1_agreement_stderr": math.sqrt(0.8 * 0.2 / 5),
        "delta_p_mean": 0.0,
        "delta_p_rms": math.sqrt(0.1 / 5),
        "delta_p_p01": -0.2 + 0.04 * 0.1,  # rank 0.04 between -0.2 and -0.1
        "delta_p_median": 0.0,
        "delta_p_p99": 0.1 + 0.96 * 0.1,
        "scored_tokens": 5,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    assert isinstance(m["scored_tokens"], int)


def test_summarize_drift_of_one_token_has_zero_standard_errors():
    m = summarize_drift({"kld": [0.5], "nll_ref": [1.0], "nll_var": [2.0], "top1": [0.0], "delta_p": [0.1]})
    assert m["kld_mean_stderr"] == m["ln_ppl_ratio_stderr"] == m["perplexity_stderr"] == 0.0
    assert m["top1_agreement_stderr"] == 0.0 and m["scored_tokens"] == 1


def test_token_drift_per_token_values_by_hand():
    p = torch.tensor([[[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]], dtype=torch.float64)  # (1, 2, 3)
    q = torch.tensor([[[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]]], dtype=torch.float64)
    t = token_drift(p.log(), q.log(), torch.tensor([[1, 0]]))
    assert set(t) == {"kld", "nll_ref", "nll_var", "top1", "delta_p"}
    kl = [sum(a * math.log(a / b) for a, b in zip(pr, qr, strict=True)) for pr, qr in
          (([0.7, 0.2, 0.1], [0.6, 0.3, 0.1]), ([0.2, 0.5, 0.3], [0.6, 0.3, 0.1]))]
    torch.testing.assert_close(t["kld"], torch.tensor(kl, dtype=torch.float64))
    torch.testing.assert_close(t["nll_ref"], torch.tensor([-math.log(0.2), -math.log(0.2)], dtype=torch.float64))
    torch.testing.assert_close(t["nll_var"], torch.tensor([-math.log(0.3), -math.log(0.6)], dtype=torch.float64))
    assert t["top1"].tolist() == [1.0, 0.0] and t["top1"].dtype == torch.float64
    torch.testing.assert_close(t["delta_p"], torch.tensor([0.6 - 0.7, 0.3 - 0.5], dtype=torch.float64))


def test_top1_compares_each_tokens_own_argmax():
    p = torch.tensor([[[0.2, 0.1, 0.7], [0.5, 0.3, 0.2]]], dtype=torch.float64)  # reference tops: 2, 0
    q = torch.tensor([[[0.1, 0.2, 0.7], [0.1, 0.8, 0.1]]], dtype=torch.float64)  # variant tops: 2, 1
    assert token_drift(p.log(), q.log(), torch.tensor([[0, 0]]))["top1"].tolist() == [1.0, 0.0]


def test_standard_errors_of_two_tokens():
    m = summarize_drift({"kld": [0.1, 0.3], "nll_ref": [1.0, 1.0], "nll_var": [1.0, 2.0], "top1": [1.0, 0.0],
                         "delta_p": [0.0, 0.0]})
    # sample sd of (0.1, 0.3) is 0.1 x sqrt(2); over sqrt(2) tokens: 0.1
    assert m["kld_mean_stderr"] == pytest.approx(0.1) and m["ln_ppl_ratio_stderr"] == pytest.approx(0.5)


def test_generation_agreement_prefix_stops_at_the_first_difference():
    ref = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    var = torch.tensor([[0, 2, 3], [4, 5, 0], [7, 8, 9]])  # prefixes 0, 2, 3 (a later match does not count)
    assert generation_agreement(ref, var) == {"gen_exact_match": 1 / 3, "gen_common_prefix_mean": 5 / 3}


def test_token_windows_take_the_first_full_windows():
    stream = torch.arange(23)
    w = token_windows(stream, DriftConfig(context=5, max_tokens=15))
    assert w.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert token_windows(stream, DriftConfig(context=5, max_tokens=100)).shape == (4, 5)  # 23 // 5
    assert token_windows(torch.arange(5), DriftConfig(context=5, max_tokens=5)).shape == (1, 5)
    with pytest.raises(InputError, match="evaluation text has 4 tokens, fewer than drift context 5"):
        token_windows(torch.arange(4), DriftConfig(context=5, max_tokens=5))


def test_gen_prompt_offsets_are_evenly_spaced():
    assert gen_prompt_offsets(100, DriftConfig(gen_prompts=4, gen_prompt_tokens=20)) == [0, 20, 40, 60]
    assert gen_prompt_offsets(20, DriftConfig(gen_prompts=2, gen_prompt_tokens=20)) == [0, 0]
    offsets = gen_prompt_offsets(102, DriftConfig(gen_prompts=3, gen_prompt_tokens=20))  # span 82
    assert offsets == [0, 27, 54] and all(type(o) is int for o in offsets)  # token positions, rounded down
    with pytest.raises(InputError, match="evaluation text has 19 tokens, fewer than drift gen_prompt_tokens 20"):
        gen_prompt_offsets(19, DriftConfig(gen_prompts=2, gen_prompt_tokens=20))


def test_drift_config_defaults_windows_and_reference_settings():
    cfg = DriftConfig()
    assert (cfg.context, cfg.max_tokens, cfg.batch_windows, cfg.gen_prompts, cfg.gen_prompt_tokens,
            cfg.gen_new_tokens, cfg.enabled) == (256, 8192, 8, 8, 32, 32, True)
    assert DriftConfig(context=100, max_tokens=250).windows == 2
    assert DriftConfig(batch_windows=3, enabled=False).reference_settings() == {
        "context": 256, "max_tokens": 8192, "gen_prompts": 8, "gen_prompt_tokens": 32, "gen_new_tokens": 32}
    DriftConfig(context=2, max_tokens=2, batch_windows=1, gen_prompts=1, gen_prompt_tokens=1,
                gen_new_tokens=1).validate()  # the smallest valid settings


@pytest.mark.parametrize("fields, message", [
    ({"context": 0}, "drift context must be a positive integer, got 0"),
    ({"batch_windows": 2.0}, "drift batch_windows must be a positive integer, got 2.0"),
    ({"gen_prompts": True}, "drift gen_prompts must be a positive integer, got True"),
    ({"gen_prompt_tokens": -1}, "drift gen_prompt_tokens must be a positive integer, got -1"),
    ({"context": 1}, "drift context must be >= 2 so a window has a token to score, got 1"),
    ({"context": 64, "max_tokens": 63}, r"drift max_tokens must be >= context \(64\), got 63"),
    ({"enabled": 1}, "drift enabled must be true or false, got 1"),
])
def test_drift_config_rejects_each_bad_value_with_its_message(fields, message):
    with pytest.raises(InputError, match=message):
        DriftConfig(**fields).validate()


def test_drift_config_from_dict_prefixes_the_location():
    with pytest.raises(InputError, match=r"^m\.toml \[drift\]: drift context must be >= 2"):
        DriftConfig.from_dict({"context": 1}, "m.toml [drift]")
    with pytest.raises(InputError, match=r"^m\.toml \[drift\]: must be a table, got 3$"):
        DriftConfig.from_dict(3, "m.toml [drift]")
    with pytest.raises(InputError, match=r"'contxt' is not a drift setting \(did you mean 'context'.*; allowed: "
                                         r"context, max_tokens, batch_windows"):
        DriftConfig.from_dict({"contxt": 8, "zzz": 1}, "m.toml [drift]")


def test_drift_budget_messages_and_boundaries():
    budget = DriftBudget(max_kld_mean=0.01, min_top1_agreement=0.95)
    assert budget.check({"kld_mean": 0.01, "top1_agreement": 0.95}) == []  # limits are inclusive
    assert budget.check({"kld_mean": 0.0125, "top1_agreement": 0.9}) == [
        "kld_mean 0.0125 > max_kld_mean 0.01", "top1_agreement 0.9 < min_top1_agreement 0.95"]
    assert budget.check({"kld_mean": math.nan, "top1_agreement": True}) == [
        "kld_mean was not measured (budget max_kld_mean = 0.01)",
        "top1_agreement was not measured (budget min_top1_agreement = 0.95)"]
    assert DriftBudget(max_ppl_ratio=1.0).check({"ppl_ratio": 0.5}) == []
    assert DriftBudget(min_gen_exact_match=0.5).check({"gen_exact_match": 1}) == []


@pytest.mark.parametrize("fields, message", [
    ({"max_kld_mean": -0.1}, "drift budget max_kld_mean must be a non-negative number, got -0.1"),
    ({"max_kld_p99": math.inf}, "drift budget max_kld_p99 must be a non-negative number, got inf"),
    ({"max_ppl_ratio": True}, "drift budget max_ppl_ratio must be a non-negative number, got True"),
    ({"min_top1_agreement": 1.5}, r"drift budget min_top1_agreement must be a fraction in \[0, 1\], got 1.5"),
    ({"min_gen_exact_match": -0.5}, r"drift budget min_gen_exact_match must be a fraction in \[0, 1\], got -0.5"),
])
def test_drift_budget_rejects_each_bad_limit(fields, message):
    with pytest.raises(InputError, match=message):
        DriftBudget(**fields).validate()
    DriftBudget(max_kld_mean=0, min_top1_agreement=0, min_gen_exact_match=1, max_ppl_ratio=10).validate()


def test_percentiles_are_numpy_linear_interpolation():
    values = list(np.linspace(0, 1, 11))
    m = summarize_drift({"kld": values, "nll_ref": [0.0] * 11, "nll_var": [0.0] * 11, "top1": [1.0] * 11,
                         "delta_p": values})
    assert m["kld_p90"] == pytest.approx(0.9) and m["delta_p_p01"] == pytest.approx(0.01)
    assert m["ppl_ratio"] == 1.0 and m["top1_agreement_stderr"] == 0.0
