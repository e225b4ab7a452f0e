"""Win rates, the sign test and the length-controlled win rate.

Preferences are `p_i` = probability that the evaluated model's answer beats the
reference's on pair i (1 = model, 0 = reference, 0.5 = tie), as in AlpacaEval
(its `preference - 1`).

- win_rate = 100 * mean(p); standard_error = 100 * std(p, ddof=1) / sqrt(n).
- discrete_win_rate = 100 * (#{p > 0.5} + 0.5 * #{p == 0.5}) / n.
- length_controlled_win_rate: fit logit(p_i) ~ theta + beta * tanh(z_i), where
  z_i = (len_model_i - len_ref_i) / std(len_model - len_ref) (answer lengths in
  characters), by maximum likelihood with the soft labels p_i (a fractional logistic
  regression), and report 100 * sigmoid(theta): the predicted win rate at equal length.
  When all lengths are equal z = 0, theta = logit(mean p) and the rate equals win_rate.
  Simplifications against AlpacaEval's GLM: AlpacaEval fits one theta per model jointly
  over its whole leaderboard with an instruction-difficulty term and regularisation, and
  needs its precomputed leaderboard (a download); we fit one pair of systems, no
  difficulty term, no regularisation, on this set only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def win_rates(prefs: Sequence[float]) -> dict:
    p = np.asarray(prefs, dtype=float)
    n = len(p)
    if n == 0:
        return {"n": 0, "win_rate": None, "standard_error": None, "discrete_win_rate": None}
    se = float(p.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    discrete = (np.sum(p > 0.5) + 0.5 * np.sum(p == 0.5)) / n
    return {
        "n": n,
        "win_rate": 100 * float(p.mean()),
        "standard_error": 100 * se,
        "discrete_win_rate": 100 * float(discrete),
        "n_wins": int(np.sum(p > 0.5)),
        "n_losses": int(np.sum(p < 0.5)),
        "n_ties": int(np.sum(p == 0.5)),
    }


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def length_controlled_win_rate(
    prefs: Sequence[float], model_lengths: Sequence[int], reference_lengths: Sequence[int]
) -> dict:
    """100 * sigmoid(theta) of the fit described in the module docstring, and beta.

    Two parameters: a hand-written Newton solve (scipy/sklearn are not dependencies of this
    project and would be heavy for a 2x2 system)."""
    p = np.asarray(prefs, dtype=float)
    diff = np.asarray(model_lengths, float) - np.asarray(reference_lengths, float)
    sd = diff.std()
    z = np.tanh(diff / sd) if sd > 0 else np.zeros_like(diff)
    X = np.stack([np.ones_like(z), z], axis=1)
    if not np.any(z):
        X = X[:, :1]  # beta is not identifiable when every length difference is zero
    w = np.zeros(X.shape[1])
    for _ in range(100):
        q = _sigmoid(X @ w)
        grad = X.T @ (p - q)
        hess = (X * (q * (1 - q))[:, None]).T @ X + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        w = np.clip(w + step, -30, 30)  # all-wins / all-losses: theta runs to +-inf
        if np.max(np.abs(step)) < 1e-10:
            break
    beta = float(w[1]) if len(w) > 1 else 0.0
    return {"length_controlled_win_rate": 100 * float(_sigmoid(w[0])), "length_coefficient": beta}


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped): scipy's binomtest when installed, else the
    exact binomial sum by hand (scipy is optional here)."""
    n = wins + losses
    if n == 0:
        return 1.0
    try:
        from scipy.stats import binomtest

        return float(binomtest(wins, n, 0.5).pvalue)
    except ImportError:
        pass
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def tally_line(model: str, wins: int, reference: str, losses: int, ties: int) -> str:
    """The paper's form: "adapter 90 : 89 base, 73 ties"."""
    return f"{model} {wins} : {losses} {reference}, {ties} ties"
