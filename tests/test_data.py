"""Tests of rlhf_lightning.data: formats, sources, errors, truncation, collators, data modules."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from rlhf_lightning.data import (
    DataError,
    DataSourceError,
    PreferenceCollator,
    PreferenceDataModule,
    PreferenceExample,
    PromptCollator,
    PromptDataModule,
    encode_prompt,
    encode_response,
    extract_prompt,
    load_examples,
    load_prompts,
    normalize_row,
    parse_hh_dialogue,
    read_rows,
    truncate_pair,
)
from rlhf_lightning.data.datamodule import split_indices, train_part
from rlhf_lightning.data.preference import compare_splits

REAL_HH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless/pairs.jsonl.gz"


@pytest.fixture(scope="session")
def tok():
    from rlhf_lightning.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def header_ids(tok):
    """Token ids of the chat template's assistant header (the generation prompt)."""
    return tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- helpers


def write_rows(path: Path, rows: list[dict]) -> Path:
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


def write_lines(path: Path, lines: list[bytes | str]) -> Path:
    path.write_bytes(b"".join((ln.encode("utf-8") if isinstance(ln, str) else ln) + b"\n" for ln in lines))
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def hh_row(question: str, good: str, bad: str) -> dict:
    head = f"\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: {question}\n\nAssistant:"
    return {"chosen": f"{head} {good}", "rejected": f"{head} {bad}"}


HH_PROMPT = [user("Hi there"), assistant("Hello! How can I help?")]


def rows_of(fmt: str, n: int = 3) -> tuple[list[dict], list[PreferenceExample]]:
    """n rows in the given layout and the examples they must normalize to (where left empty)."""
    rows, expected = [], []
    for i in range(n):
        q, good, bad = f"Question {i}?", f"Good answer {i}.", f"Bad answer {i}."
        if fmt == "hh":
            rows.append(hh_row(q, good, bad))
            prompt = HH_PROMPT + [user(q)]
        elif fmt == "standard":
            rows.append({"prompt": f"\n\nHuman: {q}\n\nAssistant:", "chosen": f" {good}", "rejected": f" {bad}"})
            prompt = [user(q)]
        elif fmt == "standard_plain":
            rows.append({"prompt": q, "chosen": good, "rejected": bad})
            prompt = [user(q)]
        elif fmt == "conversational":
            rows.append({"prompt": [user(q)], "chosen": [assistant(good)], "rejected": [assistant(bad)]})
            prompt = [user(q)]
        elif fmt == "implicit":
            rows.append({"chosen": [user(q), assistant(good)], "rejected": [user(q), assistant(bad)]})
            prompt = [user(q)]
        else:
            raise AssertionError(fmt)
        expected.append(PreferenceExample(prompt=prompt, chosen=good, rejected=bad, where=""))
    return rows, expected


FORMATS = ["hh", "standard", "standard_plain", "conversational", "implicit"]
EXTENSIONS = [".jsonl", ".jsonl.gz", ".parquet", ".json"]


# ----------------------------------------------------------------------------- formats and sources


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_parses_from_every_file_type(tmp_path, fmt, ext):
    rows, expected = rows_of(fmt)
    path = write_rows(tmp_path / f"data{ext}", rows)
    examples, skipped = load_examples(str(path))
    assert skipped == Counter()
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [(e.prompt, e.chosen, e.rejected)
                                                                   for e in expected]
    assert [e.where for e in examples] == [f"{path}:{i}" for i in (1, 2, 3)]


def test_parse_hh_dialogue():
    assert parse_hh_dialogue("\n\nHuman: a\n\nAssistant: b") == [user("a"), assistant("b")]
    assert parse_hh_dialogue("\n\nHuman: a\n\nAssistant:  b \n\nHuman: c\n\nAssistant:") == [
        user("a"), assistant("b"), user("c")]
    assert parse_hh_dialogue("Human: a\n\nAssistant: b") == [user("a"), assistant("b")]
    for bad in ("just some text", "", "preamble\n\nHuman: a\n\nAssistant: b"):
        with pytest.raises(ValueError):
            parse_hh_dialogue(bad)


def test_hh_rows_whose_final_turns_differ_use_the_shared_prefix():
    head = "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:"
    row = {"chosen": head + " good\n\nHuman: more\n\nAssistant: fine", "rejected": head + " bad"}
    ex = normalize_row(row, "f:1")
    assert ex.prompt == [user("q1"), assistant("a1"), user("q2")]
    assert ex.chosen == "good\n\nHuman: more\n\nAssistant: fine" and ex.rejected == "bad"


def test_conversational_with_system_and_multi_turn_prompt():
    prompt = [{"role": "system", "content": "Be nice."}, user("a"), assistant("b"), user("c")]
    ex = normalize_row({"prompt": prompt, "chosen": [assistant("yes")], "rejected": [assistant("no")]}, "f:1")
    assert ex.prompt == prompt and (ex.chosen, ex.rejected) == ("yes", "no")
    implicit = normalize_row({"chosen": prompt + [assistant("yes")], "rejected": prompt + [assistant("no")]}, "f:2")
    assert implicit.prompt == prompt and (implicit.chosen, implicit.rejected) == ("yes", "no")


def test_directory_source_prefers_split_files_and_data_dir(tmp_path):
    sub = tmp_path / "harmless-base"
    sub.mkdir()
    write_rows(sub / "train.jsonl.gz", rows_of("hh", 3)[0])
    write_rows(sub / "test.jsonl.gz", rows_of("hh", 2)[0])
    train = list(read_rows(str(tmp_path), split="train", data_dir="harmless-base"))
    test = list(read_rows(str(sub), split="test"))
    assert len(train) == 3 and all("train.jsonl.gz" in w for w, _ in train)
    assert len(test) == 2 and all("test.jsonl.gz" in w for w, _ in test)
    assert len(list(read_rows(str(sub), split="validation"))) == 5  # no such split file: all files


def test_hub_path_calls_load_dataset(monkeypatch):
    import datasets

    calls = []
    rows = rows_of("hh", 4)[0]

    def fake_load_dataset(name, data_dir=None, split=None, **kwargs):
        calls.append((name, data_dir, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples, skipped = load_examples("Anthropic/hh-rlhf", split="test", data_dir="harmless-base")
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "test")]
    assert len(examples) == 4 and not skipped
    assert examples[0].chosen == "Good answer 0."
    assert examples[2].where.startswith("Anthropic/hh-rlhf") and examples[2].where.endswith(":3")


def test_hub_failure_says_offline_and_suggests_local_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError) as info:
        load_examples("someone/some-dataset")
    message = str(info.value)
    assert "someone/some-dataset" in message and "Offline" in message and "local path" in message


@pytest.mark.parametrize("source", ["./nope/pairs.jsonl", "/definitely/missing", "~/missing_dir_xyz",
                                    "data/missing.jsonl.gz", "missing.parquet"])
def test_nonexistent_local_path(monkeypatch, source):
    import datasets

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("a local-looking path went to the Hub")

    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    with pytest.raises(FileNotFoundError, match="missing|nope"):
        load_examples(source)


# ----------------------------------------------------------------------------- malformed rows

GOOD = json.dumps(hh_row("Q?", "yes", "no"))
HH_BOTH = hh_row("Q?", "same", "same")

MALFORMED = {
    # name: (line 2 of the file, reason, key or None, fragment of the message)
    "malformed_json": ('{"chosen": "\\n\\nHuman: a", ', "bad_json", None, "malformed JSON"),
    "missing_key": (json.dumps({"chosen": GOOD}), "missing_key", "rejected", "keys present: 'chosen'"),
    "misnamed_key": (json.dumps({"prompt": "q", "choosen": "a", "rejected": "b"}), "missing_key", "chosen",
                     "'choosen'"),
    "wrong_type": (json.dumps({"prompt": "q", "chosen": 5, "rejected": "b"}), "bad_type", "chosen", "int"),
    "wrong_message_type": (json.dumps({"prompt": [user("q")], "chosen": "a", "rejected": [assistant("b")]}),
                           "bad_type", "chosen", "list of messages"),
    "empty_string": (json.dumps({"prompt": "q", "chosen": "  ", "rejected": "b"}), "empty", "chosen", "empty"),
    "identical": (json.dumps(HH_BOTH), "identical", "chosen", "identical"),
    "bad_dialogue": (json.dumps({"chosen": "no turns here", "rejected": "nor here"}), "bad_dialogue", "chosen",
                     "Assistant:"),
    "invalid_utf8": (b'{"chosen": "\xff\xfe bad bytes", "rejected": "x"}', "bad_utf8", None, "UTF-8"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_row_raises_naming_file_line_and_key(tmp_path, name):
    line, reason, key, fragment = MALFORMED[name]
    path = write_lines(tmp_path / "pairs.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as info:
        load_examples(str(path))
    err = info.value
    assert isinstance(err, ValueError)
    assert err.reason == reason
    assert f"{path}:2" in str(err)
    assert fragment in str(err)
    if key is not None:
        assert err.key == key and repr(key) in str(err)


def test_skip_mode_counts_and_logs_each_reason(tmp_path, caplog):
    names = ["malformed_json", "missing_key", "misnamed_key", "wrong_type", "empty_string", "identical",
             "bad_dialogue", "invalid_utf8", "missing_key"]
    lines = [GOOD]
    for n in names:
        lines += [MALFORMED[n][0], GOOD]
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.data"):
        examples, skipped = load_examples(str(path), on_error="skip")
    assert len(examples) == len(names) + 1
    assert skipped == Counter({"missing_key": 3, "bad_json": 1, "bad_type": 1, "empty": 1, "identical": 1,
                               "bad_dialogue": 1, "bad_utf8": 1})
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "rlhf_lightning.data" and r.levelno == logging.WARNING]
    assert len(warnings) == len(skipped)
    for reason, count in skipped.items():
        assert any(f"skipped {count} row(s)" in w and reason in w for w in warnings), (reason, warnings)


def test_no_usable_row(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="no usable row.*empty.jsonl"):
        load_examples(str(empty))
    all_bad = write_lines(tmp_path / "bad.jsonl", [MALFORMED["identical"][0], MALFORMED["missing_key"][0]])
    with pytest.raises(ValueError, match="no usable row.*bad.jsonl") as info:
        load_examples(str(all_bad), on_error="skip")
    assert not isinstance(info.value, DataError)


def test_limit_stops_after_n_usable_rows(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", rows_of("hh", 5)[0])
    examples, _ = load_examples(str(path), limit=2)
    assert [e.chosen for e in examples] == ["Good answer 0.", "Good answer 1."]


# ----------------------------------------------------------------------------- tokens and truncation


def test_encode_prompt_with_and_without_chat_template(tok, header_ids, monkeypatch):
    messages = [user("What is 2+2?")]
    ids = encode_prompt(tok, messages)
    assert ids[-len(header_ids):] == header_ids
    assert "What is 2+2?" in tok.decode(ids)
    monkeypatch.setattr(tok, "chat_template", None)
    plain = tok.decode(encode_prompt(tok, [user("a"), assistant("b"), user("c")]))
    assert plain.endswith("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:")


def test_encode_response_ends_with_eos_without_bos(tok):
    ids = encode_response(tok, "Four.")
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.bos_token_id not in ids
    assert tok.decode(ids[:-1]) == "Four."
    assert encode_response(tok, "") == [tok.eos_token_id]


def test_truncate_pair_keeps_prompt_end_and_responses():
    prompt, chosen, rejected = list(range(100)), list(range(1000, 1010)), list(range(2000, 2005))
    p, c, r, cut = truncate_pair(prompt, chosen, rejected, max_length=50)
    assert cut and p == list(range(60, 100)) and c == chosen and r == rejected
    assert len(p) + len(c) == 50
    same = truncate_pair(prompt[:20], chosen, rejected, max_length=50)
    assert same == (prompt[:20], chosen, rejected, False)


def test_truncate_pair_cuts_long_responses_from_the_right():
    prompt, chosen, rejected = list(range(30)), list(range(1000, 1060)), list(range(2000, 2055))
    p, c, r, cut = truncate_pair(prompt, chosen, rejected, max_length=50, min_prompt_tokens=8)
    assert cut and p == list(range(22, 30))
    assert c == chosen[:42] and r == rejected[:42]
    short = truncate_pair([7, 8, 9], chosen, rejected, max_length=50)  # prompt shorter than min_prompt_tokens
    assert short[0] == [7, 8, 9] and short[1] == chosen[:47] and short[2] == rejected[:47]


def test_truncate_pair_identical_after_truncation():
    with pytest.raises(DataError) as info:
        truncate_pair(list(range(10)), [5] * 45 + [1], [5] * 45 + [2], max_length=50)
    assert info.value.reason == "identical_after_truncation"
    with pytest.raises(ValueError):
        truncate_pair([1], [2], [3], max_length=8)


# ----------------------------------------------------------------------------- collators


def test_preference_collator_shapes_padding_and_alignment():
    items = [{"prompt_ids": [11, 12], "chosen_ids": [21, 22, 23], "rejected_ids": [31]},
             {"prompt_ids": [13], "chosen_ids": [24], "rejected_ids": [32, 33, 34, 35, 36]}]
    batch = PreferenceCollator(pad_token_id=0)(items)
    assert set(batch) == {"input_ids", "attention_mask", "response_lengths"}
    assert batch["response_lengths"].tolist() == [3, 1, 1, 5]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (4, 6) and ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[11, 12, 21, 22, 23, 0], [13, 24, 0, 0, 0, 0],
                            [11, 12, 31, 0, 0, 0], [13, 32, 33, 34, 35, 36]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6]


def test_prompt_collator_left_pads():
    batch = PromptCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "prompt_index": 4},
                                            {"input_ids": [8], "prompt_index": 1}])
    assert set(batch) == {"input_ids", "attention_mask", "prompt_index"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["prompt_index"].tolist() == [4, 1]
    assert all(t.dtype == torch.long for t in batch.values())


# ----------------------------------------------------------------------------- data modules


def test_preference_datamodule_batches_line_up(tok, tmp_path):
    rows = [hh_row(f"Topic {i}?", f"GOOD{i} fine answer.", f"BAD{i} answer.") for i in range(12)]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(tok, str(path), val_size=4, batch_size=3, seed=1)
    dm.setup()
    assert dm.stats["train"] == 8 and dm.stats["val"] == 4 and dm.stats["truncated"] == 0
    batch = next(iter(dm.train_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 6 and ids.shape == mask.shape
    for i in range(3):
        good = tok.decode(ids[i][mask[i].bool()])
        bad = tok.decode(ids[3 + i][mask[3 + i].bool()])
        n = good.split("GOOD")[1][0]
        assert f"Topic {n}?" in good and f"Topic {n}?" in bad and f"BAD{n}" in bad and "BAD" not in good
        assert good.split("GOOD")[0] == bad.split("BAD")[0]  # same prompt
        for row in (i, 3 + i):  # reward is read at the last attended token: the EOS
            assert ids[row, mask[row].sum() - 1] == tok.eos_token_id
            assert mask[row, : mask[row].sum()].all() and not mask[row, mask[row].sum():].any()
    train_where = {it["where"] for it in dm.train_dataset}
    dm.setup()  # re-entry does nothing
    assert {it["where"] for it in dm.train_dataset} == train_where


def test_preference_datamodule_truncates_and_drops(tok, tmp_path):
    long_q = " ".join(["word"] * 300)
    rows = [hh_row(long_q, "short yes", "short no"),
            hh_row("q", "same start " * 100 + "A", "same start " * 100 + "B"),
            hh_row("q2", "fine", "bad")]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"pairs.jsonl:2"):
        PreferenceDataModule(tok, str(path), max_length=64, val_size=0).setup()
    dm = PreferenceDataModule(tok, str(path), max_length=64, val_size=0, on_error="skip")
    dm.setup()
    assert dm.stats["dropped"] == {"identical_after_truncation": 1}
    assert dm.stats["truncated"] == 1 and dm.stats["kept"] == 2
    items = {it["where"].rsplit(":", 1)[1]: it for it in dm.train_dataset}
    first = items["1"]
    assert len(first["prompt_ids"]) + len(first["chosen_ids"]) == 64
    assert tok.decode(first["chosen_ids"]) == "short yes" + tok.eos_token
    assert tok.decode(first["prompt_ids"]).endswith("word<|im_end|>\n<|im_start|>assistant\n")


def test_split_is_seeded_deterministic_and_disjoint(tok, tmp_path):
    train, val = split_indices(50, 10, seed=3)
    assert (train, val) == split_indices(50, 10, seed=3)
    assert split_indices(50, 10, seed=4) != (train, val)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(50))
    assert len(split_indices(50, 0.2, seed=0)[1]) == 10
    with pytest.raises(ValueError, match="no training rows"):
        split_indices(5, 5, seed=0)

    path = write_rows(tmp_path / "pairs.jsonl", rows_of("conversational", 20)[0])

    def wheres(**kw):
        dm = PreferenceDataModule(tok, str(path), val_size=5, seed=7, **kw)
        dm.setup()
        return [it["where"] for it in dm.train_dataset], [it["where"] for it in dm.val_dataset]

    a_train, a_val = wheres()
    assert (a_train, a_val) == wheres()
    assert len(a_val) == 5 and len(a_train) == 15 and not set(a_train) & set(a_val)
    l_train, l_val = wheres(limit=8)
    assert len(l_train) == 3 and len(l_val) == 5 and (l_train, l_val) == wheres(limit=8)
    with pytest.raises(ValueError, match="no training rows"):
        PreferenceDataModule(tok, str(path), val_size=20).setup()


def test_train_part_partitions_the_training_rows():
    rows = [3, 5, 8, 13, 21, 34, 55, 89, 144, 233]
    parts = [train_part(rows, (k, 3), seed=0) for k in range(3)]
    assert [len(p) for p in parts] == [4, 3, 3]  # 10 = 4 + 3 + 3: the first 10 % 3 parts get one more
    assert sorted(sum(parts, [])) == rows  # disjoint, and together all of them
    assert all(p == sorted(p) for p in parts)
    assert parts == [train_part(rows, (k, 3), seed=0) for k in range(3)]  # seeded
    assert parts != [train_part(rows, (k, 3), seed=1) for k in range(3)]
    assert train_part(rows[::-1], None, seed=0) == rows and train_part(rows, (0, 1), seed=0) == rows
    for bad in ((2, 2), (-1, 2), (0, 0), (0,), (0.0, 2), (True, 2)):
        with pytest.raises(ValueError, match="train_part must be"):
            train_part(rows, bad, seed=0)
    with pytest.raises(ValueError, match="cannot make 11 non-empty parts"):
        train_part(rows, (0, 11), seed=0)


def test_train_parts_are_disjoint_and_held_out_on_the_same_pairs(tok, tmp_path):
    """A proxy (part 0 of 2) and a judge (part 1 of 2): disjoint training pairs, the same held-out pairs,
    both recorded by split_record."""
    path = write_rows(tmp_path / "pairs.jsonl", rows_of("conversational", 21)[0])

    def record(part):
        dm = PreferenceDataModule(tok, str(path), val_size=5, seed=7, train_part=part)
        dm.setup()
        assert dm.stats["train_part"] == (None if part is None else list(part))
        return dm.split_record()

    whole, proxy, judge = record(None), record((0, 2)), record((1, 2))
    assert proxy["val"] == judge["val"] == whole["val"] and len(whole["val"]) == 5
    assert (len(proxy["train"]), len(judge["train"])) == (8, 8)  # 16 = 8 + 8
    assert not set(proxy["train"]) & set(judge["train"])
    assert sorted(proxy["train"] + judge["train"]) == whole["train"]
    assert (proxy["train_part"], proxy["val_size"], proxy["seed"], proxy["limit"]) == ([0, 2], 5, 7, None)
    assert compare_splits(proxy, judge) == {"shared_train": 0, "first_train_held_out_by_second": 0,
                                            "second_train_held_out_by_first": 0, "same_val": True, "same_source": True}
    assert compare_splits(whole, judge)["shared_train"] == 8
    other_seed = PreferenceDataModule(tok, str(path), val_size=5, seed=8, train_part=(1, 2))
    other_seed.setup()
    crossed = compare_splits(proxy, other_seed.split_record())
    assert not crossed["same_val"] and crossed["first_train_held_out_by_second"] > 0
    with pytest.raises(RuntimeError, match="setup"):
        PreferenceDataModule(tok, str(path)).split_record()


def test_train_loader_shuffle_is_seeded(tok, tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", rows_of("standard_plain", 16)[0])

    def first_batch(seed):
        dm = PreferenceDataModule(tok, str(path), val_size=0, batch_size=4, seed=seed)
        dm.setup()
        return next(iter(dm.train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not all(torch.equal(first_batch(0), first_batch(s)) for s in (1, 2, 3))


def test_prompt_datamodule(tok, header_ids, tmp_path):
    rows = ([{"prompt": f"Plain prompt {i}"} for i in range(4)]
            + [{"prompt": [user(f"Message prompt {i}")]} for i in range(3)]
            + [hh_row(f"hh question {i}", "a", "b") for i in range(2)]
            + [{"prompt": "Long " + "blah " * 400}])
    path = write_lines(tmp_path / "prompts.jsonl", [json.dumps(r) for r in rows])
    dm = PromptDataModule(tok, str(path), max_prompt_length=60, val_size=2, batch_size=3)
    dm.setup()
    assert dm.stats["truncated"] == 1 and dm.stats["train"] == 8 and dm.stats["val"] == 2
    assert dm.prompts[4] == [user("Message prompt 0")]
    assert dm.prompts[7] == HH_PROMPT + [user("hh question 0")]
    assert all(ids[-len(header_ids):] == header_ids for ids in dm.prompt_ids)
    assert len(dm.prompt_ids[9]) == 60 and dm.decode_prompt(9).endswith("blah<|im_end|>\n<|im_start|>assistant\n")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 8 prompts, batch 3, drop_last
    seen = []
    for b in batches:
        ids, mask, index = b["input_ids"], b["attention_mask"], b["prompt_index"]
        assert ids.shape == mask.shape and ids.shape[0] == 3 and index.shape == (3,)
        assert mask[:, -1].all()  # left padding: every prompt ends in the last column
        for row, i in enumerate(index.tolist()):
            assert ids[row][mask[row].bool()].tolist() == dm.prompt_ids[i]
            seen.append(i)
    val_index = [i for b in dm.val_dataloader() for i in b["prompt_index"].tolist()]
    assert len(val_index) == 2 and not set(val_index) & set(seen)
    again = PromptDataModule(tok, str(path), max_prompt_length=60, val_size=2, batch_size=3)
    again.setup()
    assert [b["prompt_index"].tolist() for b in again.train_dataloader()] == [
        b["prompt_index"].tolist() for b in batches]


def test_prompt_datamodule_keeps_dataset_columns_for_reward_functions(tok, tmp_path):
    """Every key but prompt/chosen/rejected is a column; columns() gives them per prompt, None where absent."""
    rows = [{"prompt": "What is 2 + 3?", "answer": "5", "level": 1}, {"prompt": "What is 4 + 4?", "answer": "8"},
            hh_row("hh question", "a", "b")]
    path = write_lines(tmp_path / "tasks.jsonl", [json.dumps(r) for r in rows])
    dm = PromptDataModule(tok, str(path), batch_size=1)
    dm.setup()
    assert dm.columns([1, 0, 2]) == {"answer": ["8", "5", None], "level": [None, 1, None]}
    assert dm.columns([2]) == {}


def test_prompt_datamodule_reads_held_out_prompts_from_another_split(tok, tmp_path):
    """val_split=heldout: every train.jsonl row trains, every heldout.jsonl row is held out (with its columns)."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"train {i}", "answer": str(i)}) + "\n"
                                                  for i in range(5)))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"prompt": f"held out {i}", "answer": str(-i)}) + "\n"
                                                    for i in range(3)))
    dm = PromptDataModule(tok, str(tmp_path), batch_size=2, val_size=2, val_split="heldout")
    dm.setup()
    assert dm.stats["train"] == 5 and dm.stats["val"] == 3
    batch = dm.sample_batch(3)
    assert dm.columns(batch["prompt_index"].tolist()) == {"answer": ["0", "-1", "-2"]}
    assert [dm.prompts[i][-1]["content"] for i in batch["prompt_index"].tolist()] == [f"held out {i}" for i in range(3)]


def test_prompt_rows_errors(tmp_path):
    assert extract_prompt({"chosen": [user("q"), assistant("a")]}, "f:1") == [user("q")]
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "ok"}), json.dumps({"question": "x"}),
                                              json.dumps({"prompt": ""})])
    with pytest.raises(DataError, match=r"p.jsonl:2.*'prompt'.*'question'"):
        load_prompts(str(path))
    prompts, skipped = load_prompts(str(path), on_error="skip")
    assert prompts == [[user("ok")]] and skipped == Counter({"missing_key": 1, "empty": 1})


# ----------------------------------------------------------------------------- the real hh data


@pytest.fixture(scope="module")
def real_pairs(tok):
    if not REAL_HH.exists():
        pytest.skip(f"{REAL_HH} not present")
    dm = PreferenceDataModule(tok, str(REAL_HH), max_length=512, val_size=200)
    dm.setup()
    return dm


def test_real_hh_pairs(real_pairs):
    stats = real_pairs.stats
    assert stats["rows"] == 2025 and stats["dropped"] == {}
    assert stats["train"] == 1825 and stats["val"] == 200
    assert len(real_pairs.train_dataset) == 1825 and len(real_pairs.val_dataset) == 200
    for it in list(real_pairs.train_dataset) + list(real_pairs.val_dataset):
        assert len(it["prompt_ids"]) + max(len(it["chosen_ids"]), len(it["rejected_ids"])) <= 512
        assert it["chosen_ids"] != it["rejected_ids"]
    batch = next(iter(real_pairs.val_dataloader()))
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape == batch["attention_mask"].shape


def test_real_hh_prompts_end_with_assistant_header(tok, header_ids):
    if not REAL_HH.exists():
        pytest.skip(f"{REAL_HH} not present")
    examples, skipped = load_examples(str(REAL_HH))
    assert len(examples) == 2025 and not skipped
    assert all(e.prompt[-1]["role"] == "user" for e in examples)
    dm = PromptDataModule(tok, str(REAL_HH), max_prompt_length=256, batch_size=8)
    dm.setup()
    assert len(dm.prompts) == 2025
    assert all(len(ids) <= 256 and ids[-len(header_ids):] == header_ids for ids in dm.prompt_ids)


# ----------------------------------------------------------------------------- refused and unreachable sources


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("name", ["rows.pkl", "rows.pt", "rows.PICKLE"])
def test_pickle_data_files_are_refused_unread(tmp_path, name):
    import pickle

    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps([_RunsCodeWhenUnpickled(marker)]))
    for source in (str(path), str(tmp_path / "missing.pkl")):
        with pytest.raises(DataSourceError, match="pickle") as info:
            load_examples(source)
        assert source in str(info.value)
    assert not marker.exists()


def test_unsupported_data_file_type_is_refused(tmp_path):
    path = write_lines(tmp_path / "rows.txt", [json.dumps(rows_of("hh", 1)[0][0])])
    with pytest.raises(DataSourceError, match=r"unsupported data file .*rows.txt.*\.jsonl"):
        load_examples(str(path))


def test_prompt_longer_than_max_length_is_cut_and_counted_in_the_log(tok, tmp_path, caplog):
    rows = [{"prompt": "Long " + "blah " * 200}] + [{"prompt": f"short {i}"} for i in range(3)]
    path = write_lines(tmp_path / "prompts.jsonl", [json.dumps(r) for r in rows])
    dm = PromptDataModule(tok, str(path), max_prompt_length=40, batch_size=2)
    with caplog.at_level(logging.INFO, logger="rlhf_lightning.data"):
        dm.setup()
    assert dm.stats["truncated"] == 1 and max(len(ids) for ids in dm.prompt_ids) == 40
    assert any("1 cut to 40 tokens" in r.getMessage() for r in caplog.records)


def test_unreachable_hub_dataset_offline_is_one_error_line(tmp_path):
    """train.py with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and an uncached Hub name: one line, exit 2."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c")}
    cmd = [sys.executable, str(root / "train.py"), "stage=reward", "model=tiny", "data.path=nobody/no-such-dataset",
           f"hydra.run.dir={tmp_path}", "callbacks=none", "logger=none", "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "nobody/no-such-dataset" in errors[0] and "HF_HUB_OFFLINE and HF_DATASETS_OFFLINE set" in errors[0]
    assert "local path" in errors[0]


# ----------------------------------------------------------------------------- resumable training loader


def test_resumable_loader_continues_mid_epoch_and_restarts_other_epochs():
    from rlhf_lightning.data.resumable import ResumableDataLoader, resumable_loader

    def loader():
        return resumable_loader(list(range(10)), batch_size=2, shuffle=True, seed=5, collate_fn=list)

    first = loader()
    assert isinstance(first, ResumableDataLoader)
    first.sampler.set_epoch(3)
    epoch = [b for b in first]
    assert sorted(i for b in epoch for i in b) == list(range(10)) and len(epoch) == 5
    assert [b for b in first] == epoch  # the order depends on (seed, epoch) only
    iterator = iter(first)
    done = [next(iterator), next(iterator)]
    state = first.state_dict()
    assert state == {"epoch": 3, "batches": 2}

    resumed = loader()
    resumed.load_state_dict(state)
    pending = iter(resumed)
    resumed.sampler.set_epoch(3)  # Lightning sets the epoch after iter(), before the first batch
    assert done + list(pending) == epoch
    assert resumed.state_dict() == {"epoch": 3, "batches": 5}
    other = loader()
    other.load_state_dict(state)
    other.sampler.set_epoch(4)
    assert len([b for b in other]) == 5  # another epoch: from its first batch
    assert [b for b in other] != epoch
