"""Tests for rlhf_lightning.data.rlvr: the generated verifiable prompt datasets."""

from __future__ import annotations

import json
import re

import pytest

from rlhf_lightning.data.rlvr import TASKS, WORDS, main, make_rows, make_splits, write_task


def _key(row: dict):
    """The problem a row asks, recovered from its prompt text (independent of the generator's own keys)."""
    if row["task"] == "compare":
        return frozenset(int(x) for x in re.findall(r"\d+", row["prompt"]))
    if row["task"] in ("add", "add_mix"):
        return tuple(int(x) for x in re.findall(r"\d+", row["prompt"]))
    return tuple(re.search(r"list: (.*)\?", row["prompt"]).group(1).split(", "))


def _check_answer(row: dict) -> None:
    prompt, answer = row["prompt"], row["answer"]
    if row["task"] in ("add", "add_mix"):
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\? Reply with the number only\.", prompt).groups())
        hi = 9 if row["task"] == "add" else 19
        assert 1 <= a <= hi and 1 <= b <= 9
        assert answer == str(a + b)
    elif row["task"] == "compare":
        a, b = map(int, re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", prompt).groups())
        assert a != b and 10 <= a <= 99 and 10 <= b <= 99
        assert answer == str(max(a, b))
    else:
        words = re.fullmatch(r"What is the first word of this list: (.*)\? Reply with that word only\.",
                             prompt).group(1).split(", ")
        assert len(words) == 4 == len(set(words)) and set(words) <= set(WORDS)
        assert answer == words[0]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_correct_by_construction_and_splits_disjoint(task):
    n_heldout = 20
    n_train = min(200, TASKS[task].space - n_heldout)
    train, heldout = make_splits(task, n_train, n_heldout, seed=3)
    assert len(train) == n_train and len(heldout) == n_heldout
    for row in train + heldout:
        assert set(row) == {"prompt", "answer", "task"} and row["task"] == task
        _check_answer(row)
    train_keys, heldout_keys = {_key(r) for r in train}, {_key(r) for r in heldout}
    assert len(train_keys) == n_train and len(heldout_keys) == n_heldout  # no repeated problem within a split
    assert not train_keys & heldout_keys


def test_compare_disjoint_on_unordered_pairs():
    # "47 or 82" and "82 or 47" are one problem: all 4005 pairs split with none shared across splits.
    train, heldout = make_splits("compare", TASKS["compare"].space - 5, 5, seed=0)
    assert not {_key(r) for r in train} & {_key(r) for r in heldout}


def test_deterministic_with_a_seed_and_heldout_independent_of_train_size():
    a = make_splits("add_mix", 50, 20, seed=7)
    assert a == make_splits("add_mix", 50, 20, seed=7)
    assert a != make_splits("add_mix", 50, 20, seed=8)
    assert make_splits("add_mix", 100, 20, seed=7)[1] == a[1]
    assert make_rows("compare", 10, seed=1) == make_rows("compare", 10, seed=1)


def test_instruction_default_none_and_custom():
    default = make_rows("add_mix", 5, seed=4)
    bare = make_rows("add_mix", 5, seed=4, instruction="")
    custom = make_rows("add_mix", 5, seed=4, instruction=" Answer briefly. ")
    for d, b, c in zip(default, bare, custom, strict=True):
        assert re.fullmatch(r"What is \d+ \+ \d+\?", b["prompt"])
        assert d["prompt"] == b["prompt"] + " Reply with the number only."
        assert c["prompt"] == b["prompt"] + " Answer briefly."
        assert d["answer"] == b["answer"] == c["answer"]  # same problems: the instruction does not touch the draw
    assert make_rows("compare", 1)[0]["prompt"].endswith("?")  # compare has no default instruction


def test_whole_space_can_be_drawn_and_no_more():
    train, heldout = make_splits("add", 61, 20)
    assert {_key(r) for r in train + heldout} == {(a, b) for a in range(1, 10) for b in range(1, 10)}
    with pytest.raises(ValueError, match="task 'add' has 81 distinct problems; cannot draw 62 train \\+ 20"):
        make_splits("add", 62, 20)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_rows("nope", 1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_rows("add", -1)


def test_write_task_files_and_cli(tmp_path, capsys):
    paths = write_task(tmp_path / "a", "compare", 30, 10, seed=2)
    lines = paths["train"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30 and paths["heldout"].read_text().count("\n") == 10
    assert [json.loads(line) for line in lines] == make_splits("compare", 30, 10, seed=2)[0]
    assert main(["--task", "compare", "--out", str(tmp_path / "b"), "--train", "30", "--heldout", "10",
                 "--seed", "2"]) == 0
    assert "wrote 30 rows" in capsys.readouterr().out
    for split in ("train", "heldout"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    with pytest.raises(SystemExit) as err:
        main(["--task", "add", "--out", str(tmp_path / "c"), "--train", "100", "--heldout", "10"])
    assert err.value.code == 2
    assert "error: make_splits: task 'add' has 81 distinct problems" in capsys.readouterr().err


def test_prompt_data_module_reads_the_task(tmp_path, tokenizer):
    from rlhf_lightning.data import PromptDataModule

    write_task(tmp_path, "add_mix", 40, 8, seed=0)
    dm = PromptDataModule(tokenizer, str(tmp_path), split="train", batch_size=4)
    dm.setup()
    assert dm.stats["rows"] == 40 and dm.stats["dropped"] == {}
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert dm.prompts[0] == [{"role": "user", "content": first["prompt"]}]
    assert first["prompt"] in dm.decode_prompt(0)
    held = PromptDataModule(tokenizer, str(tmp_path), split="heldout", batch_size=4)
    held.setup()
    assert held.stats["rows"] == 8


def test_bench_measurement_runs_on_the_tiny_model(tiny_dir, tokenizer):
    """bench/rlvr_task.py's measurement loop end to end (random model: only the bookkeeping is checked)."""
    import sys
    from pathlib import Path

    import torch

    from rlhf_lightning.models import load_policy
    from rlhf_lightning.rewards.functions import load_reward_functions
    from rlhf_lightning.rollout.sampler import GenerationConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from rlvr_task import SPECS, run

    torch.manual_seed(0)
    rows = make_rows("add_mix", 3, seed=0)
    specs = [s for s in SPECS["add_mix"] if not s["fn"].endswith("math_answer")]  # math-verify is optional
    out = run(load_policy(tiny_dir), tokenizer, rows, load_reward_functions(specs), samples=2,
              config=GenerationConfig(max_new_tokens=4), do_sample=True, seed=0, chunk=4)
    assert out["samples"] == 6 and len(out["all"]) == 6 and sum(out["pass_per_prompt"]) == 3
    assert [r["prompt"] for r in out["all"]] == [r["prompt"] for r in rows for _ in range(2)]
    assert all(-1.0 <= r["soft_overlong_penalty"] <= 0.0 for r in out["all"])
    assert 0.0 <= out["mixed_groups"] <= 1.0
