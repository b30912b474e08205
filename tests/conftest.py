"""Shared fixtures: tiny random models (a 2-layer Qwen2, a tiny BERT) and small data files.

The tokenizer is a byte-level BPE trained here on the bundled data, so any
text (Chinese included) tokenizes without a model hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import settings
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from intentlora.config import BUNDLED_DATA, Config, load_config
from intentlora.data import load_file

ROOT = Path(__file__).resolve().parents[1]

# CI replays the same examples every run (a red build must be reproducible);
# local runs keep exploring new ones, which is how bugs get found.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
SHARED = ROOT.parent / "shared"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def bundled_rows() -> dict[str, list[dict]]:
    return {
        split: [{"text": ex.text, "label": ex.label} for ex in load_file(BUNDLED_DATA / f"{split}.jsonl").examples]
        for split in ("train", "test")
    }


def _tokenizer(texts: list[str], **special) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(special.values())
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, bundled_rows) -> Path:
    """A 2-layer Qwen2 folder whose tokenizer has no pad token, as many decoders ship."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    texts = [r["text"] for r in bundled_rows["train"]]
    tokenizer = _tokenizer(texts, eos_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = Qwen2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=512,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, bundled_rows) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    texts = [r["text"] for r in bundled_rows["train"]]
    tokenizer = _tokenizer(texts, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    tokenizer.save_pretrained(folder)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def small_data(tmp_path, bundled_rows) -> tuple[Path, Path]:
    """40 train / 20 test rows of the bundled data (all five labels)."""
    return write_jsonl(tmp_path / "train.jsonl", bundled_rows["train"][:40]), write_jsonl(tmp_path / "test.jsonl", bundled_rows["test"][:20])


def tiny_config(model: Path, train: Path, test: Path, output: Path, **overrides) -> Config:
    values = {
        "model.name": str(model), "data.train": str(train), "data.test": str(test), "output.dir": str(output),
        "train.epochs": 2, "train.lr": 5e-3, "train.batch_size": 8, "train.precision": "fp32",
        # Exactly `epochs` passes: the default step floor and early stopping are tested in test_recipe.py.
        "train.min_steps": 0, "train.early_stopping_patience": None,
        # Dropout on (the default is off), so that resuming and checkpointing must replay the RNG state.
        "lora.dropout": 0.05,
        # The bare text, so token counts and truncation are the texts' own: the default template is tested in
        # test_recipe.py (every entry point) and test_e2e.py (the real model, defaults).
        "data.prompt_template": None,
    }
    values.update(overrides)
    return load_config(None, assignments=list(values.items()))  # as --set: None sets null, not "not given"


THREE_LABELS = ["balance", "card_lost", "refund"]


def _train_tiny_run(base: Path, folder: Path, rows: dict[str, list[dict]]) -> Path:
    """A complete run directory (adapter, labels.json, config.yaml, metrics.json); no baselines, for speed."""
    from intentlora.train import train

    train_file = write_jsonl(folder / "train.jsonl", rows["train"])
    test_file = write_jsonl(folder / "test.jsonl", rows["test"])
    cfg = tiny_config(base, train_file, test_file, folder / "run", **{"eval.baselines": []})
    return train(cfg, echo=lambda _: None).run_dir


@pytest.fixture(scope="session")
def tiny_run(tiny_qwen2, tmp_path_factory, bundled_rows) -> Path:
    """A trained run directory on `tiny_qwen2` with the bundled five labels."""
    rows = {"train": bundled_rows["train"][:60], "test": bundled_rows["test"][:25]}
    return _train_tiny_run(tiny_qwen2, tmp_path_factory.mktemp("tiny-run"), rows)


@pytest.fixture(scope="session")
def tiny_run_3labels(tiny_qwen2, tmp_path_factory, bundled_rows) -> Path:
    """A second run on the same `tiny_qwen2` base with three labels (THREE_LABELS): another adapter, another head shape."""
    rows = {split: [r for r in bundled_rows[split] if r["label"] in THREE_LABELS] for split in ("train", "test")}
    rows = {"train": rows["train"][:45], "test": rows["test"][:15]}
    return _train_tiny_run(tiny_qwen2, tmp_path_factory.mktemp("tiny-run-3labels"), rows)


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    """`tiny_run` merged by `export`: a plain transformers classifier folder."""
    from intentlora.models import merge_run

    return merge_run(tiny_run, tmp_path_factory.mktemp("tiny-export") / "model")


@pytest.fixture(scope="session")
def pickled_qwen2(tiny_qwen2, tmp_path_factory) -> Path:
    """`tiny_qwen2` with its weights as a pickle `pytorch_model.bin` only.

    transformers 5 writes safetensors whatever `safe_serialization` says, so
    the pickle is written with torch.save, as older transformers did.
    """
    import shutil

    import torch
    from safetensors.torch import load_file as load_safetensors

    folder = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(tiny_qwen2, folder)
    torch.save(load_safetensors(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder
