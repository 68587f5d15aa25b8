"""rlhf_lightning.config.paths.looks_like_local_path, and that every source check uses it (models, validate, data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_lightning.config.paths import looks_like_local_path

LOCAL = ["./model", "../model", ".hidden", "/abs/model", "~/model", "outputs/reward/model", "a/b/c"]
HUB = ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "Anthropic/hh-rlhf", "someone/some-critic", "model"]


@pytest.mark.parametrize("name", LOCAL)
def test_local_looking_names(name):
    assert looks_like_local_path(name) is True


@pytest.mark.parametrize("name", HUB)
def test_hub_ids_are_not_local(name):
    assert looks_like_local_path(name) is False


def test_path_objects_are_accepted():
    assert looks_like_local_path(Path("/abs/model")) is True
    assert looks_like_local_path(Path("gpt2")) is False


def test_resolve_pretrained_follows_the_rule(tmp_path, monkeypatch):
    from rlhf_lightning.models import resolve_pretrained

    monkeypatch.chdir(tmp_path)  # relative names resolve against an empty folder, "~" against another
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in LOCAL:
        with pytest.raises(FileNotFoundError, match="model directory not found"):
            resolve_pretrained(name)
    for name in HUB:
        assert resolve_pretrained(name) == name  # passed on to from_pretrained unchanged


def test_data_sources_follow_the_rule(tmp_path, monkeypatch):
    """A missing data source with two '/' and no data extension is a missing path, not a Hub dataset."""
    import datasets

    from rlhf_lightning.data import DataSourceNotFoundError, read_rows

    hub_calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kwargs: hub_calls.append(name) or [])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataSourceNotFoundError, match="data source not found: data/hh/harmless-base"):
        list(read_rows("data/hh/harmless-base"))
    assert hub_calls == []
    assert list(read_rows("Anthropic/hh-rlhf")) == [] and hub_calls == ["Anthropic/hh-rlhf"]
