"""The model card: Hub metadata that parses, the numbers of the run, and usage snippets that run as written."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from intentlora.card import DOWNLOAD_LINE, guess_language, hub_base_model, render_model_card, write_model_card
from intentlora.data import load_file
from intentlora.predict import IntentClassifier


def run_copy(run: Path, tmp_path: Path) -> Path:
    """A copy, so that writing a card or calibration.json leaves the shared fixture alone."""
    return Path(shutil.copytree(run, tmp_path / run.name))


def metrics_and_config(folder: Path) -> tuple[dict, dict]:
    return json.loads((folder / "metrics.json").read_text(encoding="utf-8")), yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))


def python_snippets(card_text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.S)


def run_snippet(code: str, path: Path, text: str) -> str:
    """Run a card snippet on a local folder instead of a download; what it prints."""
    assert DOWNLOAD_LINE in code
    code = code.replace(DOWNLOAD_LINE, f"path = {str(path)!r}").replace('["..."]', json.dumps([text], ensure_ascii=False)).replace('"..."', json.dumps(text, ensure_ascii=False))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "card-snippet", "exec"), {})  # noqa: S102 - our own card's code, on our own tiny model
    return out.getvalue()


def test_run_card_metadata_and_numbers(tiny_run, tmp_path):
    run = run_copy(tiny_run, tmp_path)
    metrics, config = metrics_and_config(run)
    metrics["baselines"] = {"tfidf": {**metrics["lora"], "macro_f1": 0.5, "accuracy": 0.6, "weighted_f1": 0.55}}  # tiny_run trains without baselines
    card = ModelCard.load(write_model_card(run, metrics, config, merged=False))
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-classification"
    assert "base_model" not in data  # a local folder has no Hub id
    assert data["language"] == ["zh"]  # the bundled data is Chinese
    scores = {m["name"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert scores == {"macro F1": round(metrics["lora"]["macro_f1"], 4), "accuracy": round(metrics["lora"]["accuracy"], 4), "weighted F1": round(metrics["lora"]["weighted_f1"], 4)}
    # every label with its count in the train file and its test support
    train_counts = Counter(ex.label for ex in load_file(config["data"]["train"]).examples)
    for label in metrics["labels"]:
        assert f"| {label} | {train_counts[label]} | {metrics['lora']['per_class'][label]['support']} |" in card.text
    assert "| tfidf | 0.5000 | 0.6000 | 0.5500 |" in card.text
    assert f"| **lora (this model)** | {metrics['lora']['macro_f1']:.4f} |" in card.text
    assert f"truncated: only their first {config['data']['max_length']} tokens" in card.text
    assert "No fallback threshold is stored" in card.text
    assert " layers\n" not in card.text  # every layer adapted: nothing to say
    config["lora"]["top_layers"] = 1
    assert "in the last 1 layers\n" in render_model_card(run, metrics, config, merged=False)


def test_card_states_the_calibrated_threshold(tiny_run, tmp_path):
    run = run_copy(tiny_run, tmp_path)
    (run / "calibration.json").write_text(json.dumps({"threshold": 0.4321, "precision": 0.95, "coverage": 0.8, "fallback_label": "other", "target_precision": 0.95}), encoding="utf-8")
    text = write_model_card(run, *metrics_and_config(run), merged=False).read_text(encoding="utf-8")
    assert "A fallback threshold of 0.4321" in text and "get the label `other`" in text


def test_run_card_snippets_predict_what_intentlora_predicts(tiny_run, tmp_path):
    """The intentlora and plain-PEFT snippets, run as written (on the local folder), give the run's prediction."""
    run = run_copy(tiny_run, tmp_path)
    snippets = python_snippets(write_model_card(run, *metrics_and_config(run), merged=False).read_text(encoding="utf-8"))
    assert len(snippets) == 2
    text = "我的卡丢了"
    expected = IntentClassifier.from_pretrained(run).predict([text])[0].label
    assert ast.literal_eval(run_snippet(snippets[0], run, text))["label"] == expected
    assert run_snippet(snippets[1], run, text).strip() == expected


def test_plain_peft_snippet_applies_the_runs_prompt_template(tiny_run, tmp_path):
    """With data.prompt_template, the PEFT snippet wraps the text as intentlora does, and predicts what it predicts."""
    run = run_copy(tiny_run, tmp_path)
    metrics, config = metrics_and_config(run)
    config["data"]["prompt_template"] = "消息：{text}\n意图："
    (run / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    peft_snippet = python_snippets(write_model_card(run, metrics, config, merged=False).read_text(encoding="utf-8"))[1]
    assert 'template = "消息：{text}\\n意图："' in peft_snippet
    for text in ("我的卡丢了", "查一下余额", "退款什么时候到"):
        expected = IntentClassifier.from_pretrained(run).predict([text])[0].label
        assert run_snippet(peft_snippet, run, text).strip() == expected


def test_export_card_is_a_transformers_model_whose_pipeline_snippet_runs(tiny_run, tiny_export, tmp_path):
    export = Path(shutil.copytree(tiny_export, tmp_path / "export"))
    metrics, config = metrics_and_config(tiny_run)
    card = ModelCard.load(write_model_card(export, metrics, config, merged=True))
    assert card.data.library_name == "transformers"
    assert "vllm serve REPO_ID --runner pooling" in card.text
    text = "查一下余额"
    expected = IntentClassifier.from_pretrained(export).predict([text])[0].label
    (snippet,) = [s for s in python_snippets(card.text) if "pipeline(" in s]
    assert f"'label': '{expected}'" in run_snippet(snippet, export, text)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("pypi:qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct"),
        ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
        ("models/base.gguf", None),
        ("modelscope:Qwen/Qwen2.5-1.5B-Instruct", None),
    ],
)
def test_base_model_is_a_hub_id_or_nothing(spec, expected):
    assert hub_base_model(spec) == expected


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["我的卡丢了", "查一下余额"], ["zh"]),
        (["カードをなくしました", "残高を確認したい"], ["ja"]),
        (["카드를 잃어버렸어요"], ["ko"]),
        (["I lost my card", "what is the balance of my account"], ["en"]),
        (["Ich habe meine Karte verloren"], None),  # Latin script, but not English: not guessed
        ([], None),
    ],
)
def test_language_is_guessed_only_where_the_script_tells(texts, expected):
    assert guess_language(texts) == expected


def test_train_and_export_write_their_cards(tiny_run, tiny_export):
    """`train` puts a card in the run, `export` one in the merged folder (each titled by its folder)."""
    run_card, export_card = ModelCard.load(tiny_run / "README.md"), ModelCard.load(tiny_export / "README.md")
    assert (run_card.data.library_name, export_card.data.library_name) == ("peft", "transformers")
    assert run_card.text.startswith(f"\n# {tiny_run.name}\n") and export_card.text.startswith(f"\n# {tiny_export.name}\n")
