"""lmkl.formatting: the one number formatter, checked against strings worked out by hand."""

from __future__ import annotations

import math

import pytest

from lmkl.formatting import (
    MISSING,
    format_ci,
    format_column,
    format_count,
    format_interval,
    format_mean_se,
    format_percent,
    format_percent_column,
    format_percent_se,
    format_rate,
    format_ratio,
    format_value,
    metric_with_ci,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.95917, "0.9592"),  # four significant digits
        (74.2913, "74.29"),
        (0.00061234, "6.123e-04"),  # below 0.001: scientific, never 0.0006
        (4.0741e-05, "4.074e-05"),
        (0.000123, "1.230e-04"),  # a p95 of 0.000123 is not "0.0001"
        (6853.9, "6,854"),  # rates and counts from 1,000 up: whole numbers
        (17362.4, "17,362"),
        (9.99996, "10.00"),  # rounding carries into the next power of ten
        (0.0, "0"),
        (3, "3"),
        (1137556, "1,137,556"),
        ("inf", "inf"),
        (-math.inf, "-inf"),
        (None, MISSING),
        (math.nan, MISSING),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_a_column_keeps_distinct_values_distinct():
    # At four significant digits 0.95917 and 0.95921 both print 0.9592: the column gets five.
    assert format_column([0.95917, 0.95921, 1.5]) == ["0.95917", "0.95921", "1.5000"]
    assert format_column([0.5, 0.25]) == ["0.5000", "0.2500"]
    assert format_column([1, 2.5, None]) == ["1", "2.500", MISSING]
    assert format_percent_column([0.12341, 0.12344]) == ["12.341%", "12.344%"]


def test_an_interval_never_prints_ends_equal_to_the_mean():
    assert format_interval(0.9592, 0.8630, 1.069) == "0.9592 [0.8630, 1.069]"
    # The "[0.0006, 0.0006]": now the ends differ visibly.
    assert format_interval(0.000612, 0.0006081, 0.0006163) == "6.120e-04 [6.081e-04, 6.163e-04]"
    assert format_interval(0.5, 0.50001, 0.50003) == "0.50000 [0.50001, 0.50003]"
    assert format_ci([0.0006081, 0.0006163]) == "[6.081e-04, 6.163e-04]"
    assert format_ci(None) == MISSING


def test_mean_and_one_standard_error():
    # The "0.0006 ± 1.562e-05": the mean as everywhere else, the error to two digits.
    assert format_mean_se(0.000612345, 1.562e-05) == "6.123e-04 ± 1.6e-05"
    assert format_mean_se(0.95917, 0.00604) == "0.9592 ± 0.0060"
    assert format_mean_se(2.5, 0.000123) == "2.500 ± 0.00012"  # fixed beside a fixed mean
    assert format_mean_se(0.19491, 0.000962) == "0.1949 ± 0.00096"
    assert format_mean_se(0.003181, 0.019865) == "0.003181 ± 0.020"
    assert format_mean_se(0.9, None) == "0.9000"
    assert format_percent_se(0.8731, 0.0042) == "87.3% ± 0.42%"
    assert metric_with_ci({"mean": 0.9592, "se": 0.006, "ci_low": 0.863, "ci_high": 1.069}) == (
        "0.9592 [0.8630, 1.069]"
    )
    assert metric_with_ci({"mean": 0.9592, "se": 0.006}) == "0.9592 ± 0.0060"


def test_percent_ratio_rate_count():
    assert format_percent(0.8731) == "87.3%"
    assert format_percent(0.000412) == "0.0412%"  # never "0.0%" for a share that is not 0
    assert format_percent(0.0) == "0%"
    assert format_percent(1.0) == "100%"
    # "perplexity is 1× the reference's (74.291 vs 74.107)": the difference from 1 shows.
    assert format_ratio(74.291 / 74.107) == "1.0025×"
    assert format_ratio(2.5) == "2.50×"
    assert format_ratio(1.0) == "1.000×"
    assert format_ratio(1.05) == "1.050×"
    assert format_rate(173624, 10.0) == "17,362 tokens/s"
    assert format_rate(68539, 10.0) == "6,854 tokens/s"  # one style for every rate
    assert format_rate(12, 3.0) == "4.00 tokens/s"
    # The first progress reading (a batch over microseconds) is not a rate yet.
    assert format_rate(1_137_556, 0.000_9) == "– tokens/s"
    assert format_count(1137556) == "1,137,556"


def test_the_older_names_keep_their_meaning_in_the_new_style():
    from lmkl.formatting import interval, mean_se, number, percent

    assert percent(0.4567, 1) == "45.7%" and percent(0.4567, 0) == "46%"
    assert percent(0.0004) == "0.0400%"  # the token view's "p(next) 0.0%"
    assert number(6853.9, 1) == "6,854"  # "number(x, 1)" never rounds to one digit
    assert interval([0.0006081, 0.0006163], 3) == "[6.08e-04, 6.16e-04]"
    assert mean_se({"mean": 0.95917, "se": 0.00604}) == "0.9592 ± 0.0060"
