"""Data from `datasets`: save_to_disk folders and hf: specs, offline (a local folder stands in for a Hub repository)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from intentlora.data import load_file
from intentlora.hubdata import is_dataset_spec, read_rows
from tests.conftest import tiny_config

LABELS = ["balance", "card_lost", "refund"]


def classlabel_dataset(texts: list[str], label_ids: list[int]) -> datasets.Dataset:
    features = datasets.Features({"utterance": datasets.Value("string"), "intent": datasets.ClassLabel(names=LABELS), "id": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"utterance": texts, "intent": label_ids, "id": list(range(len(texts)))}, features=features)


@pytest.fixture
def saved(tmp_path) -> dict[str, Path]:
    """A single Dataset and a DatasetDict (train/test) written by save_to_disk, with ClassLabel intents."""
    single = classlabel_dataset(["查余额", "卡丢了", "我要退款"], [0, 1, 2])
    single.save_to_disk(tmp_path / "single")
    splits = datasets.DatasetDict({
        "train": classlabel_dataset(["查余额", "卡丢了", "我要退款", "余额多少"], [0, 1, 2, 0]),
        "test": classlabel_dataset(["卡找不到了", ""], [1, 2]),
    })
    splits.save_to_disk(tmp_path / "splits")
    return {"single": tmp_path / "single", "splits": tmp_path / "splits"}


def test_class_label_ids_become_names_with_row_numbers(saved):
    spec = str(saved["single"])
    assert is_dataset_spec(spec)
    rows, problems = read_rows(spec, "utterance", "intent")
    assert problems == []
    assert rows == [(1, {"utterance": "查余额", "intent": "balance"}), (2, {"utterance": "卡丢了", "intent": "card_lost"}), (3, {"utterance": "我要退款", "intent": "refund"})]


def test_dataset_dict_split_is_chosen_with_at(saved):
    rows, problems = read_rows(f"{saved['splits']}@test", "utterance", "intent")
    assert problems == []
    assert [r for _, r in rows] == [{"utterance": "卡找不到了", "intent": "card_lost"}, {"utterance": "", "intent": "refund"}]


@pytest.mark.parametrize(
    ("suffix", "fields", "expected"),
    [
        ("", ("utterance", "intent"), "the dataset has several splits (train, test): name one, e.g. {spec}@train"),
        ("@valid", ("utterance", "intent"), "no split 'valid' (it has: train, test)"),
        ("@train", ("text", "intent"), "no field 'text' (it has: utterance, intent, id); name yours with --text-field / --label-field"),
    ],
)
def test_whole_source_problems_name_what_it_has(saved, suffix, fields, expected):
    spec = f"{saved['splits']}{suffix}"
    rows, problems = read_rows(spec, *fields)
    assert rows == []
    assert [(p.where, p.message) for p in problems] == [(spec, expected.format(spec=spec))]


def test_split_of_a_single_dataset_is_refused(saved):
    spec = f"{saved['single']}@train"
    _, problems = read_rows(spec, "utterance", "intent")
    assert [p.message for p in problems] == ["@train: this dataset has no splits (it is a single Dataset); drop @train"]


def test_hf_spec_loads_through_load_dataset(tmp_path, monkeypatch):
    """hf:NAME goes to datasets.load_dataset; a local repository folder (train/test files) is what a Hub download is."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # not the user's cache
    repo = tmp_path / "repo"
    repo.mkdir()
    for split, rows in {"train": [("查余额", "balance"), ("卡丢了", "card_lost")], "test": [("我要退款", "refund")]}.items():
        (repo / f"{split}.jsonl").write_text("".join(json.dumps({"q": t, "y": y}, ensure_ascii=False) + "\n" for t, y in rows), encoding="utf-8")
    rows, problems = read_rows(f"hf:{repo}@train", "q", "y")
    assert problems == []
    assert rows == [(1, {"q": "查余额", "y": "balance"}), (2, {"q": "卡丢了", "y": "card_lost"})]


def test_unloadable_specs_are_one_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network retries in tests
    spec = "hf:no-such-owner/no-such-dataset@train"
    rows, problems = read_rows(spec, "text", "label")
    assert rows == [] and len(problems) == 1
    assert problems[0].where == spec and problems[0].message.startswith("cannot load the dataset: ")
    assert "no-such-owner/no-such-dataset" in problems[0].message


def test_what_is_not_a_dataset_spec(tmp_path, saved):
    (tmp_path / "plain").mkdir()
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "b"}\n', encoding="utf-8")
    assert not is_dataset_spec(str(tmp_path / "plain"))  # a folder, but not save_to_disk's
    assert not is_dataset_spec(str(tmp_path / "train.jsonl"))
    assert not is_dataset_spec(str(tmp_path / "missing@train"))
    assert is_dataset_spec("hf:org/name:config@validation")
    assert is_dataset_spec(f"{saved['splits']}@train")


def test_load_file_checks_dataset_rows_as_it_checks_lines(saved):
    """The row checks of data.load_file apply, each problem at SPEC:ROW (wired by intentlora.data)."""
    spec = f"{saved['splits']}@test"
    result = load_file(spec, labels=["card_lost", "balance"], text_field="utterance", label_field="intent")
    assert [ex.source for ex in result.examples] == [f"{spec}:1"]
    assert [(p.where, p.severity) for p in result.problems] == [(f"{spec}:2", "error")]
    assert "empty" in result.problems[0].message


def test_train_reads_a_saved_dataset_dict(tiny_qwen2, bundled_rows, tmp_path):
    """`--train FOLDER@train --test FOLDER@test`: class-label names become the labels; rows are named SPEC:ROW to the end (errors.jsonl)."""
    from intentlora.train import train

    names = sorted({r["label"] for r in bundled_rows["train"]})
    features = datasets.Features({"sentence": datasets.Value("string"), "intent": datasets.ClassLabel(names=names)})
    as_dataset = lambda rows: datasets.Dataset.from_dict(  # noqa: E731
        {"sentence": [r["text"] for r in rows], "intent": [names.index(r["label"]) for r in rows]}, features=features)
    datasets.DatasetDict({"train": as_dataset(bundled_rows["train"][:40]), "test": as_dataset(bundled_rows["test"][:20])}).save_to_disk(tmp_path / "bank")
    spec = str(tmp_path / "bank")
    cfg = tiny_config(tiny_qwen2, f"{spec}@train", f"{spec}@test", tmp_path / "run",
                      **{"eval.baselines": [], "data.text_field": "sentence", "data.label_field": "intent"})
    result = train(cfg, echo=lambda _: None)
    assert result.metrics["labels"] == names
    assert result.metrics["data"]["train"] + result.metrics["data"]["valid"] == 40 and result.metrics["data"]["test"] == 20
    errors = [json.loads(line) for line in (result.run_dir / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert errors and all(re.fullmatch(rf"{re.escape(spec)}@test:\d+", e["source"]) for e in errors)
    row = int(errors[0]["source"].rpartition(":")[2])
    assert errors[0]["text"] == bundled_rows["test"][row - 1]["text"] and errors[0]["gold"] == bundled_rows["test"][row - 1]["label"]
