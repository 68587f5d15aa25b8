"""Tests for rlhf_lightning.rewards.functions: loading specs, TRL's calling convention, the weighted sum and
every error path (one line naming the function and the row)."""

from __future__ import annotations

import functools
import math
import sys
import types

import pytest
import torch

from rlhf_lightning.rewards.functions import (
    RewardFunction,
    RewardFunctionError,
    RewardSpecError,
    load_reward_functions,
    score_with_functions,
)

# --------------------------------------------------------------------------- helpers: a module to import


def _length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _matches(completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def _strict(completions, answer):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def _scaled(completions, factor=1.0, **kwargs):
    return [factor * len(c) for c in completions]


@pytest.fixture
def helper_module(monkeypatch):
    """A module ``rf_helpers`` importable by dotted path, with a few reward functions."""
    mod = types.ModuleType("rf_helpers")
    mod.length = _length
    mod.matches = _matches
    mod.scaled = _scaled
    mod.strict = _strict
    mod.not_callable = 3
    mod.nested = types.SimpleNamespace(length=_length)
    monkeypatch.setitem(sys.modules, "rf_helpers", mod)
    return mod


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- load_reward_functions


def test_load_dotted_paths_weights_names_and_kwargs(helper_module):
    fns = load_reward_functions([
        {"fn": "rf_helpers.length", "weight": 0.5},
        {"fn": "rf_helpers.scaled", "weight": 2, "name": "scaled3", "kwargs": {"factor": 3.0}},
        {"fn": "rf_helpers.nested.length", "name": "nested"},
        {"fn": "rlhf_lightning.rewards.verifiers.format_match"},
    ])
    assert [f.name for f in fns] == ["length", "scaled3", "nested", "format_match"]
    assert [f.weight for f in fns] == [0.5, 2.0, 1.0, 1.0]
    assert all(isinstance(f, RewardFunction) for f in fns)
    assert fns[1](["ab"]) == [6.0]  # factor bound by kwargs
    assert fns[1].kwargs == {"factor": 3.0}
    assert fns[0].source == "rf_helpers.length"


def test_load_accepts_omegaconf(helper_module):
    from omegaconf import OmegaConf

    specs = OmegaConf.create([{"fn": "rf_helpers.scaled", "weight": 1.5, "kwargs": {"factor": 2}}])
    (fn,) = load_reward_functions(specs)
    assert fn.weight == 1.5 and fn(["abc"]) == [6]


def test_load_accepts_a_callable():
    (fn,) = load_reward_functions([{"fn": _length, "weight": 1.0}])
    assert fn.name == "_length" and fn(["abcd"]) == [4.0]


@pytest.mark.parametrize("spec, expected", [
    ({"fn": "no_such_module_xyz.fn"}, "cannot import 'no_such_module_xyz.fn'"),
    ({"fn": "rf_helpers.missing"}, "has no attribute 'missing'"),
    ({"fn": "notdotted"}, "not a dotted path"),
    ({"fn": "rf_helpers.not_callable"}, "not a callable"),
    ({"fn": "rf_helpers.length", "weight": float("nan")}, "weight must be a finite number"),
    ({"fn": "rf_helpers.length", "weight": "1"}, "weight must be a finite number"),
    ({"fn": "rf_helpers.length", "wieght": 1}, "unknown key(s) ['wieght']"),
    ({"weight": 1}, "missing 'fn'"),
    ({"fn": "rf_helpers.strict", "kwargs": {"factor": 2}}, "kwargs ['factor'] are not parameters of _strict"),
])
def test_load_errors_name_the_spec(helper_module, spec, expected):
    with pytest.raises(RewardSpecError) as err:
        load_reward_functions([{"fn": "rf_helpers.length", "name": "ok"}, spec])
    text = _one_line(err)
    assert text.startswith("reward_functions[1] {"), text
    assert expected in text


def test_load_import_error_inside_module_is_reported(monkeypatch, tmp_path):
    # A module that exists but fails to import (a missing dependency) reports that dependency.
    (tmp_path / "rf_broken.py").write_text("import no_such_dependency_abc\ndef f(completions, **kw):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardSpecError, match="no_such_dependency_abc") as err:
        load_reward_functions([{"fn": "rf_broken.f"}])
    _one_line(err)


def test_load_duplicate_names_and_empty_list(helper_module):
    with pytest.raises(RewardSpecError, match="already used by reward_functions\\[0\\]"):
        load_reward_functions([{"fn": "rf_helpers.length"}, {"fn": "rf_helpers.length", "weight": 2}])
    with pytest.raises(RewardSpecError, match="empty list"):
        load_reward_functions([])
    with pytest.raises(RewardSpecError, match="expected a list"):
        load_reward_functions({"fn": "rf_helpers.length"})


# --------------------------------------------------------------------------- score_with_functions


def test_weighted_sum_and_per_function(helper_module):
    fns = load_reward_functions([{"fn": "rf_helpers.length", "weight": 0.5},
                                 {"fn": "rf_helpers.matches", "weight": -2.0}])
    total, per = score_with_functions(fns, ["a", "bbb", "cc"], ["p1", "p2", "p3"], {"answer": ["a", "x", "cc"]})
    assert total.dtype == torch.float32 and total.shape == (3,)
    assert per["length"].tolist() == [1.0, 3.0, 2.0]
    assert per["matches"].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == pytest.approx([0.5 - 2.0, 1.5, 1.0 - 2.0])


def test_trl_signature_kwargs_receive_columns_prompts_and_ids():
    seen = {}

    def trl_style(completions, prompts=None, **kwargs):  # the shape of a TRL reward function
        seen.update(kwargs, prompts=prompts, completions=completions)
        return [float(k) for k in kwargs["level"]]

    total, _ = score_with_functions([trl_style], ["x", "y"], ["p0", "p1"],
                                    {"answer": ["1", "2"], "level": [3, 4]}, completion_ids=[[5, 6], [7]])
    assert total.tolist() == [3.0, 4.0]
    assert seen["completions"] == ["x", "y"] and seen["prompts"] == ["p0", "p1"]
    assert seen["answer"] == ["1", "2"] and seen["level"] == [3, 4]
    assert seen["completion_ids"] == [[5, 6], [7]]


def test_function_without_kwargs_gets_only_its_parameters():
    def strict(completions, answer):  # no prompts, no **kwargs: would fail if everything were passed
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    total, _ = score_with_functions([strict], ["1", "2"], ["p", "q"], {"answer": ["1", "3"], "other": [0, 0]})
    assert total.tolist() == [1.0, 0.0]


def test_missing_required_column_is_one_line():
    def needs_gold(completions, gold, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"'needs_gold' needs \['gold'\].*columns: \['answer'\]") as err:
        score_with_functions([needs_gold], ["a"], ["p"], {"answer": ["x"]})
    _one_line(err)


def test_conversational_completions():
    def trl_conversational(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    total, _ = score_with_functions([trl_conversational], ["abc", ""], conversational=True)
    assert total.tolist() == [3.0, 0.0]


def test_raising_function_names_function_and_row():
    def fragile(completions, **kwargs):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on the empty completion

    with pytest.raises(RewardFunctionError) as err:
        score_with_functions([fragile], ["ab", "cd", "", "e"], row_ids=["idx 10", "idx 11", "idx 12", "idx 13"])
    text = _one_line(err)
    assert "'fragile'" in text and "row 2 (idx 12)" in text and "ZeroDivisionError" in text
    assert err.value.function == "fragile" and err.value.row == 2
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_raising_on_the_whole_batch_only():
    def batch_only(completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("batch too big\nsecond line of the traceback text")
        return [0.0]

    with pytest.raises(RewardFunctionError, match="no single row fails alone.*RuntimeError: batch too big") as err:
        score_with_functions([batch_only], ["a", "b"])
    _one_line(err)
    assert err.value.row is None


@pytest.mark.parametrize("output, expected, row", [
    ([1.0], "returned 1 values for 2 completions", None),
    ([1.0, 2.0, 3.0], "returned 3 values for 2 completions", None),
    ([1.0, float("nan")], "returned nan at row 1", 1),
    ([float("inf"), 1.0], "returned inf at row 0", 0),
    ([1.0, None], "returned None at row 1", 1),
    ([1.0, "0.5"], "returned a str ('0.5') at row 1, not a number", 1),
    (0.5, "returned a float, expected a list of 2 numbers", None),
    ("ab", "returned a str, expected a list of 2 numbers", None),
])
def test_bad_outputs_are_one_line_errors(output, expected, row):
    def bad(completions, **kwargs):
        return output

    with pytest.raises(RewardFunctionError) as err:
        score_with_functions([RewardFunction("bad", bad, 1.0)], ["a", "b"])
    text = _one_line(err)
    assert text.startswith("reward function 'bad' ") and expected in text, text
    assert err.value.row == row


def test_numeric_types_accepted():
    import numpy as np

    outputs = {"ints": [1, 0], "bools": [True, False], "numpy": np.array([1.0, 0.0]),
               "tensor": torch.tensor([1.0, 0.0]), "np_scalars": [np.float32(1.0), np.int64(0)]}
    fns = [RewardFunction(name, functools.partial(lambda completions, out, **kw: out, out=out), 1.0)
           for name, out in outputs.items()]
    total, per = score_with_functions(fns, ["a", "b"])
    assert total.tolist() == [5.0, 0.0]
    assert all(v.tolist() == [1.0, 0.0] for v in per.values())


def test_input_validation():
    with pytest.raises(ValueError, match="'answer' has 1 values for 2 completions"):
        score_with_functions([_length], ["a", "b"], columns={"answer": ["x"]})
    with pytest.raises(ValueError, match="'prompts' has 3 values"):
        score_with_functions([_length], ["a", "b"], ["p", "q", "r"])
    with pytest.raises(ValueError, match="column 'prompt' is reserved"):
        score_with_functions([_length], ["a"], columns={"prompt": ["p"]})
    with pytest.raises(ValueError, match="completion at row 1 is a int"):
        score_with_functions([_length], ["a", 3])
    with pytest.raises(ValueError, match="no reward functions"):
        score_with_functions([], ["a"])
    with pytest.raises(ValueError, match="duplicate"):
        score_with_functions([RewardFunction("f", _length), RewardFunction("f", _length)], ["a"])


def test_zero_weight_is_logged_not_added():
    fns = [RewardFunction("len", _length, 0.0), RewardFunction("one", lambda completions, **kw: [1.0] * 2, 1.0)]
    total, per = score_with_functions(fns, ["abc", "de"])
    assert total.tolist() == [1.0, 1.0] and per["len"].tolist() == [3.0, 2.0]


def test_empty_batch():
    total, per = score_with_functions([_length], [])
    assert total.shape == (0,) and per["_length"].shape == (0,)
    assert not math.isnan(float(total.sum()))
