"""Tests for rlhf_lightning.rewards.verifiers on hand-written completions: correct, incorrect and edge cases."""

from __future__ import annotations

import functools
import sys

import pytest

from rlhf_lightning.rewards.functions import RewardFunctionError, load_reward_functions, score_with_functions
from rlhf_lightning.rewards.verifiers import (
    FORMAT_REGEX,
    exact_answer,
    format_match,
    last_number_answer,
    math_answer,
    normalize_answer,
    soft_overlong_penalty,
)

# --------------------------------------------------------------------------- math_answer (math-verify)


def test_math_answer_correct_and_incorrect():
    pytest.importorskip("math_verify")
    completions = ["The answer is 42.", "Answer: 42", "\\boxed{42}", "42.0", "I get 41.", "no idea", "",
                   "$\\frac{1}{2}$", "It is 0.5", "0.25"]
    answers = ["42"] * 7 + ["0.5", "\\frac{1}{2}", "1/2"]
    assert math_answer(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_math_answer_numbers_as_gold_and_conversational():
    pytest.importorskip("math_verify")
    completions = [[{"role": "assistant", "content": "so 7"}], [{"role": "assistant", "content": "so 8"}]]
    assert math_answer(completions, answer=[7, 7]) == [1.0, 0.0]


def test_math_answer_evaluates_echoed_expressions():
    """The documented weakness that makes last_number_answer the check for arithmetic tasks."""
    pytest.importorskip("math_verify")
    assert math_answer(["6 + 9"], answer=["15"]) == [1.0]
    assert last_number_answer(["6 + 9"], answer=["15"]) == [0.0]


def test_math_answer_bad_gold_is_an_error_naming_the_row():
    pytest.importorskip("math_verify")
    with pytest.raises(ValueError, match="gold answer 'not a number at all' at row 1 cannot be parsed"):
        math_answer(["1", "2"], answer=["1", "not a number at all"])
    with pytest.raises(ValueError, match="needs the dataset column 'answer'"):
        math_answer(["1"])
    expected = "'math_answer' raised at row 1: ValueError: math_answer: gold answer at row 1 is None"
    with pytest.raises(RewardFunctionError, match=expected) as err:
        score_with_functions(load_reward_functions([{"fn": "rlhf_lightning.rewards.verifiers.math_answer"}]),
                             ["1", "2"], columns={"answer": ["1", None]})
    assert "\n" not in str(err.value)


def test_math_answer_without_math_verify_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now raises ImportError
    with pytest.raises(ImportError, match=r"needs math-verify: pip install 'rlhf-lightning\[rlvr\]'") as err:
        math_answer(["1"], answer=["1"])
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- last_number_answer


@pytest.mark.parametrize("completion, score", [
    ("8 + 9 = 17", 1.0),
    ("The answer is 17.", 1.0),
    ("17", 1.0),
    ("  17.0\n", 1.0),
    ("It is 17, not 16", 0.0),  # the last number counts
    ("8 + 9", 0.0),  # nothing is evaluated
    ("seventeen", 0.0),
    ("", 0.0),
    ("-17", 0.0),
    ("1,017", 0.0),
    ("3.17", 0.0),
])
def test_last_number_answer(completion, score):
    assert last_number_answer([completion], answer=["17"]) == [score]


def test_last_number_answer_gold_forms_and_errors():
    assert last_number_answer(["-3", "1,000", "2.5"], answer=[-3, "1000", "2.50"]) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="gold answer 'twelve' at row 0 is not a number"):
        last_number_answer(["12"], answer=["twelve"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        last_number_answer(["1", "2"], answer=["1"])


# --------------------------------------------------------------------------- exact_answer


def test_exact_answer_normalisation():
    completions = ["Apple", "  apple. ", '"APPLE"', "**apple**", "The answer is apple", "apples", "apple pie"]
    assert exact_answer(completions, answer=["apple"] * 7) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert normalize_answer("  Hello   World! ") == "hello world"
    with pytest.raises(ValueError, match="gold answer '...' at row 0 is empty"):
        exact_answer(["x"], answer=["..."])


# --------------------------------------------------------------------------- format_match


def test_format_match_default_pattern():
    completions = ["Answer: 12", "Answer:12.", "  Answer: -3\n", "answer: 12", "Answer: 12 because", "12"]
    assert format_match(completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert FORMAT_REGEX == r"Answer: ?-?\d+\.?"


def test_format_match_bound_pattern_and_per_row_column():
    think = functools.partial(format_match, format_regex=r"<think>.*</think>\s*<answer>.*</answer>")
    assert think(["<think>a\nb</think>\n<answer>3</answer>", "<answer>3</answer>"]) == [1.0, 0.0]
    assert format_match(["YES", "no"], format_regex=["(?i)yes", "yes"]) == [1.0, 0.0]
    # through score_with_functions: the column arrives as a keyword list, a spec binds a constant
    fns = load_reward_functions([{"fn": "rlhf_lightning.rewards.verifiers.format_match", "name": "per_row"},
                                 {"fn": "rlhf_lightning.rewards.verifiers.format_match", "name": "bound", "weight": 2.0,
                                  "kwargs": {"format_regex": "[a-z]+"}}])
    total, per = score_with_functions(fns[:1], ["abc", "ABC"], columns={"format_regex": ["[A-Z]+", "[A-Z]+"]})
    assert per["per_row"].tolist() == [0.0, 1.0]
    total, per = score_with_functions(fns[1:], ["abc", "ABC"])
    assert per["bound"].tolist() == [1.0, 0.0] and total.tolist() == [2.0, 0.0]
    # a column named like a bound keyword is an error, not a silent override
    with pytest.raises(RewardFunctionError, match=r"'bound' has \['format_regex'\] bound in its spec"):
        score_with_functions(fns, ["abc", "ABC"], columns={"format_regex": ["[A-Z]+", "[A-Z]+"]})


def test_format_match_invalid_regex_names_the_row():
    with pytest.raises(ValueError, match=r"invalid format_regex '\(' at row 1"):
        format_match(["a", "b"], format_regex=["a", "("])


# --------------------------------------------------------------------------- soft_overlong_penalty


def test_soft_overlong_penalty_by_hand():
    # L_max = 10, L_cache = 4: 0 up to 6, then (6 - |y|) / 4 down to -1 at 10, -1 beyond.
    lengths = [0, 6, 7, 8, 10, 11, 50]
    completions = ["x" * n for n in lengths]
    assert soft_overlong_penalty(completions, max_length=10, cache_length=4) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0,
                                                                                 -1.0]


def test_soft_overlong_penalty_tokens_use_completion_ids():
    ids = [[1] * 3, [1] * 20, [1] * 24]
    completions = ["a very long text " * 10, "", "short"]  # characters ignored in token mode
    got = soft_overlong_penalty(completions, max_length=24, cache_length=12, unit="tokens", completion_ids=ids)
    assert got == [0.0, pytest.approx(-8 / 12), -1.0]
    with pytest.raises(ValueError, match="needs the dataset column 'completion_ids'"):
        soft_overlong_penalty(["a"], max_length=4, cache_length=2, unit="tokens")


@pytest.mark.parametrize("kwargs, message", [
    ({}, "bind max_length and cache_length"),
    ({"max_length": 4, "cache_length": 0}, "need 0 < cache_length <= max_length"),
    ({"max_length": 4, "cache_length": 5}, "need 0 < cache_length <= max_length"),
    ({"max_length": 4, "cache_length": 2, "unit": "words"}, "unit must be 'chars' or 'tokens'"),
])
def test_soft_overlong_penalty_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        soft_overlong_penalty(["a"], **kwargs)


def test_soft_overlong_penalty_as_a_spec_with_completion_ids():
    fns = load_reward_functions([{"fn": "rlhf_lightning.rewards.verifiers.soft_overlong_penalty", "weight": 0.5,
                                  "kwargs": {"max_length": 4, "cache_length": 2, "unit": "tokens"}}])
    total, _ = score_with_functions(fns, ["a", "b"], completion_ids=[[1, 2, 3], [1, 2, 3, 4, 5]])
    assert total.tolist() == [-0.25, -0.5]
