"""Per-token drift figures and their summary, as llama.cpp's perplexity tool reports them.

KL divergence is in nats; percentiles use numpy's linear interpolation.
"""

from __future__ import annotations

import math


def kl_divergence(ref_logprobs, var_logprobs):
    """KL(reference || variant) in nats over the last dimension: (..., V) -> (...)."""
    p = ref_logprobs.exp()
    terms = (ref_logprobs - var_logprobs).mul_(p)  # in place: one full-vocabulary temporary fewer
    terms.masked_fill_(p == 0, 0.0)  # 0 * log(0 / q) = 0, where the subtraction gave nan or -inf
    return terms.sum(-1).clamp_min(0.0)  # tiny negative values are rounding


def token_drift(ref_logprobs, var_logprobs, targets) -> dict:
    """Per-token drift figures for (b, T-1, V) log-probs and (b, T-1) next tokens, flattened to (b*(T-1),)."""
    idx = targets.unsqueeze(-1)
    top_ref = ref_logprobs.argmax(-1, keepdim=True)  # (b, T-1, 1)
    out = {
        "kld": kl_divergence(ref_logprobs, var_logprobs),
        "nll_ref": -ref_logprobs.gather(-1, idx).squeeze(-1),
        "nll_var": -var_logprobs.gather(-1, idx).squeeze(-1),
        "top1": (var_logprobs.argmax(-1, keepdim=True) == top_ref).squeeze(-1),
        "delta_p": (var_logprobs.gather(-1, top_ref).exp() - ref_logprobs.gather(-1, top_ref).exp()).squeeze(-1),
    }
    return {k: v.reshape(-1).double().cpu() for k, v in out.items()}


def _stderr(x) -> float:
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0


def summarize_drift(tokens: dict) -> dict[str, float]:
    """The reported figures from per-token arrays (``token_drift``'s keys, concatenated)."""
    import numpy as np

    t = {k: np.asarray(v, dtype=np.float64) for k, v in tokens.items()}
    n = t["kld"].size
    ln_ratio = t["nll_var"] - t["nll_ref"]
    ppl = math.exp(t["nll_var"].mean())
    kld_q = np.percentile(t["kld"], [50, 90, 95, 99, 99.9])
    dp_q = np.percentile(t["delta_p"], [1, 50, 99])
    agree = float(t["top1"].mean())
    return {
        "perplexity": ppl,
        "perplexity_stderr": ppl * _stderr(t["nll_var"]),  # delta method
        "reference_perplexity": math.exp(t["nll_ref"].mean()),
        "ppl_ratio": math.exp(ln_ratio.mean()),
        "ln_ppl_ratio": float(ln_ratio.mean()),
        "ln_ppl_ratio_stderr": _stderr(ln_ratio),
        "kld_mean": float(t["kld"].mean()),
        "kld_mean_stderr": _stderr(t["kld"]),
        "kld_median": float(kld_q[0]),
        "kld_p90": float(kld_q[1]),
        "kld_p95": float(kld_q[2]),
        "kld_p99": float(kld_q[3]),
        "kld_p999": float(kld_q[4]),
        "kld_min": float(t["kld"].min()),
        "kld_max": float(t["kld"].max()),
        "top1_agreement": agree,
        "top1_agreement_stderr": math.sqrt(agree * (1 - agree) / n),
        "delta_p_mean": float(t["delta_p"].mean()),
        "delta_p_rms": float(np.sqrt((t["delta_p"] ** 2).mean())),
        "delta_p_p01": float(dp_q[0]),
        "delta_p_median": float(dp_q[1]),
        "delta_p_p99": float(dp_q[2]),
        "scored_tokens": n,
    }


def generation_agreement(ref_tokens, var_tokens) -> dict[str, float]:
    """Exact-match fraction and mean common-prefix length (tokens) of (P, N) greedy continuations."""
    same = (ref_tokens == var_tokens).long()
    prefix = same.cumprod(dim=1).sum(dim=1).double()  # (P,) leading tokens that agree
    return {"gen_exact_match": float((prefix == ref_tokens.shape[1]).double().mean()),
            "gen_common_prefix_mean": float(prefix.mean())}
