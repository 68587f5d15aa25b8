"""reward.cache_trunk: the frozen blocks' output kept per sequence changes no score, gradient or trained weight."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlhf_lightning.data import PreferenceCollator, PreferenceDataModule
from rlhf_lightning.models import load_scalar_model
from rlhf_lightning.models.forward import right_padded_scores
from rlhf_lightning.models.trunk_cache import TrunkCache, cacheable_depth
from rlhf_lightning.modules import RewardModule


def _pairs(tokenizer, hh_file, n=4):
    dm = PreferenceDataModule(tokenizer, str(hh_file), val_size=0, max_length=48)
    dm.setup()
    return PreferenceCollator(tokenizer.pad_token_id)(dm.train_dataset.items[:n])


def test_cacheable_depth(tiny_dir):
    assert cacheable_depth(load_scalar_model(tiny_dir, trainable_layers=1)) == 1  # tiny: 2 blocks, the top trains
    assert cacheable_depth(load_scalar_model(tiny_dir, frozen=True)) == 1  # never the last block
    assert cacheable_depth(load_scalar_model(tiny_dir)) == 0  # everything trains
    with pytest.raises(ValueError, match=r"depth 2 not in \[1, 1\]"):
        TrunkCache(load_scalar_model(tiny_dir, trainable_layers=1), depth=2)
    with pytest.raises(ValueError, match=r"depth 1 not in \[1, 0\]"):
        TrunkCache(load_scalar_model(tiny_dir), depth=1)


def test_cached_scores_and_gradients_equal_the_full_forward(tiny_dir, tokenizer, hh_file):
    batch = _pairs(tokenizer, hh_file)  # 8 right-padded rows of several lengths
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["pair_index"].tolist() == [0, 1, 2, 3]  # the dataset index of each pair (val_size=0: all train)
    keys = torch.cat([2 * batch["pair_index"], 2 * batch["pair_index"] + 1])  # as RewardModule keys them
    model = load_scalar_model(tiny_dir, trainable_layers=1)
    cache = TrunkCache(model)
    full = right_padded_scores(model, ids, mask)
    cached = cache.scores(ids, mask, keys)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert (cache.misses, cache.hits, len(cache)) == (8, 0, 8)
    assert cache.bytes == int(mask.sum()) * model.config.hidden_size * 4  # float32, one vector per token kept

    grads = []
    for scorer in (lambda: right_padded_scores(model, ids, mask), lambda: cache.scores(ids, mask, keys)):
        model.zero_grad()
        (scorer() * torch.arange(1.0, 9.0)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and "score.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)
    assert (cache.misses, cache.hits) == (8, 8)  # the second call read every row from the cache
    shuffled = torch.tensor([3, 0, 7, 5, 1, 6, 2, 4])
    # found by key, wherever the row stands in the batch
    torch.testing.assert_close(cache.scores(ids[shuffled], mask[shuffled], keys[shuffled]), full[shuffled],
                               atol=1e-5, rtol=1e-5)
    assert (cache.misses, len(cache)) == (8, 8)

    with pytest.raises(ValueError, match="right-padded"):
        cache.scores(ids, mask.flip(1), keys)
    with pytest.raises(ValueError, match="distinct keys"):
        cache.scores(ids, mask, torch.zeros(8, dtype=torch.long))
    lengths = mask.sum(1)
    a, b = int(lengths.argmin()), int(lengths.argmax())
    with pytest.raises(ValueError, match="a key must name one sequence"):  # row a under row b's key
        cache.scores(ids[[a]], mask[[a]], keys[[b]])


class _CacheProbe(L.Callback):
    """Records (misses, hits) of the module's trunk cache at the end of each training epoch (None: no cache)."""

    def __init__(self):
        self.seen = {}

    def on_train_epoch_end(self, trainer, pl_module):
        c = pl_module.trunk_cache
        self.seen[trainer.current_epoch] = None if c is None else (c.misses, c.hits)


def test_reward_module_trains_the_same_with_the_cache(tiny_dir, tokenizer, hh_file, tmp_path):
    """Two epochs with and without reward.cache_trunk: the same weights at the end (float rounding)."""
    weights = []
    for cache_trunk in (False, True):
        L.seed_everything(0)
        model = load_scalar_model(tiny_dir, trainable_layers=1)
        module = RewardModule(model, tokenizer, optim={"lr": 1e-3}, cache_trunk=cache_trunk)
        dm = PreferenceDataModule(tokenizer, str(hh_file), val_size=8, batch_size=4, max_length=48)
        probe = _CacheProbe()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            default_root_dir=tmp_path, callbacks=[probe])
        trainer.fit(module, datamodule=dm)
        seen = probe.seen
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        assert module.trunk_cache is None  # released at the end of fit
        if cache_trunk:
            # 40 training pairs = 80 rows computed in epoch 1 (+ 16 validation rows); epoch 2 reads them all
            assert seen[0] == (96, 0) and seen[1] == (96, 96)
        else:
            assert seen == {0: None, 1: None}
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=1e-5, rtol=1e-4)
