"""Shared fixtures: the tiny model, its tokenizer, and small hh-format data files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# One thread per test process unless set otherwise (before torch is imported): the tiny model's operations are too
# small for a thread pool to pay on these 2-core machines (a learning run took 34 s with 1 thread, 60 s with 2), and
# the processes a test starts (torchrun, train.py, DDP workers) inherit it instead of competing for the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
HH_HARMLESS = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"

_TOPICS = ["the weather", "a recipe for bread", "how to tie a knot", "the moon", "learning Python",
           "a birthday gift", "my cat", "a train timetable", "planting tomatoes", "a chess opening"]


def make_hh_rows(n: int, seed: int = 0) -> list[dict]:
    """n synthetic hh-format preference rows (whole dialogues that differ in the last turn)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        prompt = f"\n\nHuman: Can you tell me about {topic}? ({i})\n\nAssistant:"
        rows.append({"chosen": prompt + f" Sure, here is something helpful about {topic}.",
                     "rejected": prompt + " No." + " no" * rng.randint(0, 5)})
    return rows


def ragged_prefix_mask(B: int, T: int, gen):
    """Random (B, T) bool prefix mask with row 0 full and row 1 empty (``gen``: a torch.Generator)."""
    import torch

    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = T
    lengths[1] = 0
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


@pytest.fixture(scope="session")
def tiny_dir() -> str:
    from rlhf_lightning.models import resolve_pretrained

    return resolve_pretrained("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from rlhf_lightning.models import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def hh_file(tmp_path_factory) -> Path:
    """A 48-row hh-format .jsonl file."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_hh_rows(48)))
    return path


def compose_run_config(overrides: list[str], run_dir: Path):
    """The config ``train.py <overrides>`` would run with, Hydra's part included, as in a job.

    Sets ``hydra.runtime.output_dir`` (Hydra sets it only when it runs a job) and registers the
    config with ``HydraConfig`` so that ``${hydra:...}`` interpolations resolve.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import rlhf_lightning.training.run  # noqa: F401  (registers the custom resolvers)

    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def fit_ppo_with_checkpoints(module, tokenizer, hh_file, run_dir: Path, iterations: int, ckpt_path: str | None = None):
    """``iterations`` PPO iterations of ``module`` through ``Trainer.fit`` on the tiny prompts (batch 4, seed 3),
    with a checkpoint (``<run_dir>/checkpoints/last.ckpt``) after every iteration and the RNG state in it, as
    train.py resumes; ``ckpt_path`` resumes from a checkpoint. Returns ``module``."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rlhf_lightning.data import PromptDataModule
    from rlhf_lightning.training.callbacks import RNGStateCallback

    L.seed_everything(3)
    datamodule = PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=32, seed=3)
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                  every_n_train_steps=module.optimizer_steps_per_iteration)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=iterations * module.optimizer_steps_per_iteration,
                        max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=run_dir,
                        callbacks=[checkpoints, RNGStateCallback()])
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module
