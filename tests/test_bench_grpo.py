"""bench/grpo_iteration.py: one GRPO iteration of ours and of TRL 1.16's GRPOTrainer on the tiny model (seconds;
skipped without TRL >= 1.16, which lives in its own venv: bench/README.md, "GRPO")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_grpo_bench_runs_one_iteration_of_each_side_with_equal_work_on_tiny(tmp_path):
    pytest.importorskip("trl", minversion="1.16", reason="TRL 1.16's GRPOTrainer (VENV=.venv-trl116 "
                                                         "EXTRAS=dev,bench-dpo bash scripts/setup.sh)")
    import grpo_iteration

    out = tmp_path / "grpo.json"
    result = grpo_iteration.main(["--model", "tiny", "--steps", "1", "--warmup", "0", "--no-memory", "--threads", "1",
                                  "--prompts", "2", "--generations", "2", "--max-new-tokens", "4",
                                  "--out", str(out)])
    sides = result["sides"]
    assert sides["ours"]["n"] == sides["trl"]["n"] == 1 and result["time_ratio"] > 0
    assert json.loads(out.read_text())["time_ratio"] == result["time_ratio"]
    ours, trl = (result["work"][side]["per_iteration"][0] for side in ("ours", "trl"))
    # the random tiny model practically never samples EOS: 4 columns on both sides, so equal training shapes
    assert ours["optimizer_steps"] == trl["optimizer_steps"] == 1
    assert ours["generated_columns"] == trl["generated_columns"] == 4
    assert ours["sequence_cells"] == trl["sequence_cells"] and ours["response_tokens"] == trl["response_tokens"] == 16
    assert ours["grad_tokens"] == trl["grad_tokens"] > 0
    prefill = ours["sequence_cells"] - 4 * 4  # 4 rows x P prompt columns (4 rows x 4 response columns)
    assert trl["generate_tokens"] - ours["generate_tokens"] == prefill / 2  # ours prefills each prompt once
    assert result["generation_tokens_per_s"]["ours"] > 0 and result["generation_tokens_per_s"]["trl"] > 0
