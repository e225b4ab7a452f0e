"""Win-rate arithmetic: the length-controlled rate equals the raw rate at equal lengths and
moves the right way when one system is longer; the sign test; the paper's tally form."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_alpaca.evaluate.stats import (
    length_controlled_win_rate,
    sign_test_p,
    tally_line,
    win_rates,
)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 0.99), min_size=2, max_size=40), st.integers(1, 500))
def test_lc_equals_raw_when_lengths_are_equal(prefs, length):
    lc = length_controlled_win_rate(prefs, [length] * len(prefs), [length] * len(prefs))
    assert lc["length_controlled_win_rate"] == pytest.approx(win_rates(prefs)["win_rate"], abs=1e-6)


def _length_biased(model_longer: bool):
    """A judge that prefers whichever answer is longer, plus a small quality edge for the
    model; the longer system's raw rate is inflated by length."""
    prefs, model_len, ref_len = [], [], []
    for i in range(40):
        delta = (i % 8) * 40 + 20  # 20..300 characters
        m, r = (100 + delta, 100) if model_longer else (100, 100 + delta)
        if i % 4 == 0:
            m, r = 100, 100  # a few equal-length pairs carry the length-free preference
        prefs.append(min(0.95, max(0.05, 0.55 + (m - r) / 400)))
        model_len.append(m)
        ref_len.append(r)
    return prefs, model_len, ref_len


def test_lc_discounts_the_longer_system():
    prefs, m, r = _length_biased(model_longer=True)
    raw = win_rates(prefs)["win_rate"]
    lc = length_controlled_win_rate(prefs, m, r)
    assert lc["length_coefficient"] > 0
    assert lc["length_controlled_win_rate"] < raw
    assert lc["length_controlled_win_rate"] == pytest.approx(55, abs=3)  # the equal-length edge

    prefs, m, r = _length_biased(model_longer=False)
    raw = win_rates(prefs)["win_rate"]
    lc = length_controlled_win_rate(prefs, m, r)
    assert lc["length_controlled_win_rate"] > raw


def test_win_rates_and_discrete():
    w = win_rates([1, 0, 0.5, 0.75])
    assert w["win_rate"] == pytest.approx(56.25)
    assert w["discrete_win_rate"] == pytest.approx(62.5)  # 2 wins + half a tie of 4
    sd = math.sqrt(sum((x - 0.5625) ** 2 for x in [1, 0, 0.5, 0.75]) / 3)
    assert w["standard_error"] == pytest.approx(100 * sd / 2)


def test_sign_test_exact_binomial():
    assert sign_test_p(90, 89) == pytest.approx(1.0)
    assert sign_test_p(10, 0) == pytest.approx(2 / 2**10)
    assert sign_test_p(0, 0) == 1.0
    # 7 of 9: two-sided p = 2 * P(X <= 2) = 2 * 46 / 512
    assert sign_test_p(7, 2) == pytest.approx(2 * 46 / 512)


def test_tally_line_in_the_papers_form():
    assert tally_line("adapter", 90, "base", 89, 73) == "adapter 90 : 89 base, 73 ties"
