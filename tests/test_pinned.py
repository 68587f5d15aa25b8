"""Refactoring guard: the weights after a few reward steps and PPO iterations on the tiny model, pinned to a tolerance.

The runs are in float64 (``precision=64-true``) and each network's weights are reduced to a fingerprint (their
sum, their sum of squares and their dot product with fixed pseudo-random coefficients, in float64). Machines differ
in how they round (the CI's CPUs: Intel without AVX-512, AMD EPYC with it; other BLAS kernels, other summation
orders): in float64 that moves a fingerprint by ~1e-13 relative, and Adam cannot turn it into a step (a gradient
would have to be as small as the rounding, ~1e-16, for its sign to flip, where Adam's epsilon already damps it to
nothing). A change of the RL math, the sampling or the order of random draws moves it by far more than
:data:`RTOL`; a pure refactor does not. If a deliberate change of behaviour moves them, record the new
fingerprints in the same commit (``python tests/test_pinned.py`` prints them) and say why.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlhf_lightning.data import PreferenceDataModule, PromptDataModule
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.modules import PPOModule, RewardModule

#: Relative tolerance of each fingerprint component (float64 runs agree to ~1e-13 across machines).
RTOL = 1e-8
#: (sum, sum of squares, projection) of every parameter and buffer of each network, recorded at the commit that
#: made these runs float64 and keyed PPO's sampling noise by prompt (issue 21).
REWARD_FINGERPRINT = [[379.4111350163978, 1609.1465954893065, 3.9284495955014265]]
PPO_FINGERPRINT = [[441.9100836241892, 2866.975756522219, 12.562711435688364],
                   [378.5571188596822, 1609.7022208536355, 3.264636895662907]]


def fingerprint(*models: torch.nn.Module) -> list[list[float]]:
    """Per model, ``[sum, sum of squares, sum of w * c]`` over every parameter and buffer in state-dict order, in
    float64, with ``c`` uniform in [-1, 1) from a generator seeded 0 (the same numbers on every machine)."""
    out = []
    for model in models:
        flat = torch.cat([t.detach().double().cpu().reshape(-1) for t in model.state_dict().values()])
        coefficients = torch.rand(flat.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out.append([float(flat.sum()), float((flat * flat).sum()), float((flat * (2 * coefficients - 1)).sum())])
    return out


def _trainer(tmp_path, max_steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path, precision="64-true")


def reward_run(tmp_path, tiny_dir, tokenizer, hh_file) -> RewardModule:
    L.seed_everything(0)
    module = RewardModule(load_scalar_model(tiny_dir), tokenizer, optim={"lr": 1e-3}, center_coef=0.01)
    dm = PreferenceDataModule(tokenizer, str(hh_file), val_size=8, batch_size=4, max_length=64)
    _trainer(tmp_path, 6).fit(module, datamodule=dm)
    return module


def ppo_run(tmp_path, tiny_dir, tokenizer, hh_file) -> PPOModule:
    L.seed_everything(0)
    module = PPOModule(load_policy(tiny_dir, trainable_layers=1), load_reference(tiny_dir),
                       load_scalar_model(tiny_dir, trainable_layers=1, head="zero"),
                       load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
                       ppo={"ppo_epochs": 2, "num_minibatches": 2, "num_sample_prompts": 0,
                            "log_samples_every_n_steps": 0, "generation": {"max_new_tokens": 6}},
                       policy_optim={"lr": 1e-3}, critic_optim={"lr": 1e-3})
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=48)
    _trainer(tmp_path, 2 * module.optimizer_steps_per_iteration).fit(module, datamodule=dm)
    return module


def _assert_pinned(got: list[list[float]], pinned: list[list[float]]) -> None:
    for network, (values, expected) in enumerate(zip(got, pinned, strict=True)):
        assert values == pytest.approx(expected, rel=RTOL), f"network {network}: {values} != {expected}"


def test_reward_weights_after_six_steps_are_pinned(tmp_path, tiny_dir, tokenizer, hh_file):
    _assert_pinned(fingerprint(reward_run(tmp_path, tiny_dir, tokenizer, hh_file).model), REWARD_FINGERPRINT)


def test_ppo_weights_after_two_iterations_are_pinned(tmp_path, tiny_dir, tokenizer, hh_file):
    module = ppo_run(tmp_path, tiny_dir, tokenizer, hh_file)
    _assert_pinned(fingerprint(module.policy, module.critic), PPO_FINGERPRINT)


def test_the_fingerprint_sees_a_change_far_below_a_learning_step(tiny_dir):
    """A change of one weight by 1e-6 (a thousandth of one Adam step at lr 1e-3) moves the fingerprint beyond RTOL."""
    model = load_scalar_model(tiny_dir)
    before = fingerprint(model)[0]
    with torch.no_grad():
        next(model.parameters()).view(-1)[7] += 1e-6
    after = fingerprint(model)[0]
    assert any(abs(a - b) > RTOL * abs(b) for a, b in zip(after, before, strict=True))


if __name__ == "__main__":  # print the fingerprints of this code, to pin them
    import json
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_hh_rows
    from rlhf_lightning.models import load_tokenizer, resolve_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_hh_rows(48)))
        tiny = resolve_pretrained("tiny")
        tok = load_tokenizer(tiny)
        print("REWARD_FINGERPRINT =", fingerprint(reward_run(Path(tmp), tiny, tok, data).model))
        ppo = ppo_run(Path(tmp), tiny, tok, data)
        print("PPO_FINGERPRINT =", fingerprint(ppo.policy, ppo.critic))
