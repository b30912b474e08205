"""Issue-12 paths where users got a crash or a wrong number: gradient accumulation, device placement,
one score for one artifact (train, eval, export and predict agree), honest warnings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from intentlora.cli import app
from tests.conftest import tiny_config, write_jsonl

runner = CliRunner()


def adapter_weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_gradient_accumulation_matches_one_big_batch(tiny_qwen2, tmp_path, bundled_rows):
    """batch 4 x accumulation 2 must train like batch 8 x 1: same logged losses, the same adapter up to rounding.

    Adam divides each gradient by its own running size, so an element whose gradient is near Adam's eps turns
    float rounding (which differs between CPUs) into a visible step: weights are compared per tensor by norm,
    not element by element. The random head keeps LoRA's gradients away from eps from the first step.
    Batch 4 x 1 (a different training) moves every tensor by 4% or more; rounding moves none by 0.001%."""
    from intentlora.train import train

    train_file = write_jsonl(tmp_path / "train.jsonl", bundled_rows["train"][:32])
    test_file = write_jsonl(tmp_path / "test.jsonl", bundled_rows["test"][:8])
    runs = {}
    for batch, accum in ((8, 1), (4, 2)):
        cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / f"b{batch}x{accum}", **{
            "train.batch_size": batch, "train.grad_accum": accum, "train.epochs": 1, "train.logging_steps": 1,
            "train.group_by_length": False, "lora.dropout": 0.0, "data.valid_fraction": 0.0, "eval.baselines": [],
            "lora.head_init": "random",
        })
        runs[(batch, accum)] = train(cfg).run_dir
    losses = {key: [e["loss"] for e in json.loads((run / "metrics.json").read_text())["train"]["log_history"] if "loss" in e]
              for key, run in runs.items()}
    assert len(losses[(8, 1)]) == 4
    assert losses[(4, 2)] == pytest.approx(losses[(8, 1)], rel=1e-4)
    one, two = adapter_weights(runs[(8, 1)]), adapter_weights(runs[(4, 2)])
    drift = {k: ((one[k] - two[k]).norm() / one[k].norm()).item() for k in one}
    assert max(drift.values()) < 1e-3, drift


def test_every_model_a_run_loads_goes_to_the_configured_device(tiny_qwen2, small_data, tmp_path, monkeypatch):
    """Baselines, training, the reload check and the final evaluation all load onto train.device."""
    import intentlora.models as models

    seen = []
    real = models.load_pretrained

    def spy(auto_class, path, dtype, options, device, **extra):
        model = real(auto_class, path, dtype, options, device, **extra)
        seen.append((auto_class.__name__, str(device), str(next(model.parameters()).device)))
        return model

    monkeypatch.setattr(models, "load_pretrained", spy)
    from intentlora.train import train

    train_file, test_file = small_data
    chat = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    folder = tmp_path / "chat-model"
    import shutil

    shutil.copytree(tiny_qwen2, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat}))
    cfg = tiny_config(folder, train_file, test_file, tmp_path / "run", **{
        "train.device": "cpu", "train.epochs": 1, "eval.baselines": ["random_head", "zero_shot", "tfidf"]})
    metrics = train(cfg).metrics
    kinds = [kind for kind, _, _ in seen]
    assert kinds.count("AutoModelForCausalLM") == 1  # zero-shot
    assert kinds.count("AutoModelForSequenceClassification") == 3  # training, reload check, final evaluation
    assert all(asked == "cpu" and placed == "cpu" for _, asked, placed in seen), seen
    assert metrics["train"]["device"] == "cpu"


def test_the_reported_score_is_the_score_of_what_eval_export_and_predict_load(tiny_run, tiny_export, tmp_path):
    """One score, one artifact: metrics.json, `eval --adapter`, `eval` on the export and `predict` agree."""
    from intentlora.config import load_config

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    test_file = load_config(tiny_run / "config.yaml").data.test
    reported = metrics["lora"]
    for args in (["--adapter", str(tiny_run)], ["--model", str(tiny_export)]):
        out = tmp_path / "eval.json"
        result = runner.invoke(app, ["eval", *args, "--data", test_file, "-o", str(out)])
        assert result.exit_code == 0, result.output
        evaluated = json.loads(out.read_text())
        assert evaluated["accuracy"] == reported["accuracy"]
        assert evaluated["macro_f1"] == pytest.approx(reported["macro_f1"], abs=1e-9)
    rows = [json.loads(line) for line in open(test_file, encoding="utf-8")]
    predicted = tmp_path / "predicted.jsonl"
    result = runner.invoke(app, ["predict", "-m", str(tiny_run), "--input", test_file, "--output", str(predicted)])
    assert result.exit_code == 0, result.output
    labels = [json.loads(line)["prediction"]["label"] for line in predicted.read_text().splitlines()]
    accuracy = sum(label == row["label"] for label, row in zip(labels, rows)) / len(rows)
    assert accuracy == reported["accuracy"]


def test_settings_that_would_mislead_are_refused_or_said(tiny_qwen2, small_data, tmp_path):
    from intentlora.console import Reporter
    from intentlora.train import train

    train_file, test_file = small_data
    ratio = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / "r1", **{"train.warmup_ratio": 2})
    with pytest.raises(ValueError, match="warmup_ratio is the share"):
        train(ratio)
    lines = []
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / "r2", **{
        "data.valid_fraction": 0.0, "data.max_length": 4, "train.epochs": 1, "eval.baselines": []})
    metrics = train(cfg, echo=Reporter(write=lines.append)).metrics
    text = "\n".join(lines)
    assert "the test set is also the validation set" in text and metrics["data"]["valid_is_test"] is True
    assert "longer than data.max_length=4 tokens" in text
    assert metrics["data"]["truncated"]["train"] > 0 and metrics["data"]["truncated"]["test"] > 0


def test_checkpoints_are_removed_at_the_end_unless_kept(tiny_run, tiny_qwen2, small_data, tmp_path):
    from intentlora.train import train

    assert not (tiny_run / "checkpoints").exists()
    train_file, test_file = small_data
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / "kept", **{
        "output.keep_checkpoints": True, "train.epochs": 1, "eval.baselines": []})
    assert any((train(cfg).run_dir / "checkpoints").glob("checkpoint-*"))


def test_json_log_format_is_one_object_a_line(tiny_qwen2, small_data, tmp_path):
    train_file, test_file = small_data
    result = runner.invoke(app, ["train", "--model", str(tiny_qwen2), "--train", str(train_file), "--test", str(test_file),
                                 "--epochs", "1", "--batch-size", "4", "--precision", "fp32", "--set", "eval.baselines=[tfidf]",
                                 "--output", str(tmp_path / "run"), "--log-format", "json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases[0] == "data" and phases[-1] == "done"
    assert {"baselines", "model", "training", "saving", "checking", "evaluating", "report"} <= set(phases)
    assert "train_log" in kinds and "eval" in kinds and kinds[-1] == "result"
    log = next(e for e in events if e["event"] == "train_log")
    assert {"step", "max_steps", "epoch", "loss", "learning_rate"} <= set(log)
    assert events[-1]["metrics"]["lora"]["macro_f1"] >= 0


def test_quiet_prints_the_table_and_little_else(tiny_qwen2, small_data, tmp_path):
    train_file, test_file = small_data
    result = runner.invoke(app, ["train", "--model", str(tiny_qwen2), "--train", str(train_file), "--test", str(test_file),
                                 "--epochs", "1", "--precision", "fp32", "--set", "eval.baselines=[]", "--quiet",
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "[training]" not in result.output and "step " not in result.output
    assert "lora" in result.output and "run saved to" in result.output


def test_help_groups_train_options_and_shows_defaults():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for group in ("Data", "Model", "LoRA", "Training", "Output"):
        assert f"─ {group} ─" in result.output
    assert "[default: 3.0]" in result.output and "[default: 0.0002]" in result.output  # epochs, lr
    switches = [line for line in result.output.splitlines() if "--gradient-checkpointing" in line or "--drop-unknown" in line]
    assert len(switches) == 2 and not any("<bool>" in line for line in switches)
