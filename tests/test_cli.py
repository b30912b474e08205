import json

from typer.testing import CliRunner
from transformers import AutoModelForSequenceClassification

from intentlora.cli import EXIT_INPUT, app
from tests.conftest import write_jsonl

runner = CliRunner()


def test_validate_exit_codes_and_lines(tmp_path, small_data):
    train_file, test_file = small_data
    ok = runner.invoke(app, ["validate", str(train_file), str(test_file), "--labels", "fraud_risk,refund,balance,card_lost,other"])
    assert ok.exit_code == 0, ok.output

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "refund"}\nnot json\n{"text": "", "label": "refund"}\n', encoding="utf-8")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == EXIT_INPUT
    assert f"{bad}:2: invalid JSON" in result.output
    assert f"{bad}:3: field 'text' is empty" in result.output


def test_validate_reports_test_rows_seen_in_train(tmp_path):
    train_file = write_jsonl(tmp_path / "a.jsonl", [{"text": "查余额", "label": "balance"}])
    test_file = write_jsonl(tmp_path / "b.jsonl", [{"text": "查 余额!", "label": "balance"}])
    result = runner.invoke(app, ["validate", str(train_file), str(test_file)])
    assert result.exit_code == 0
    assert f"{test_file}:1: warning: same text as {train_file}:1 (train)" in result.output


def test_train_refuses_bad_data_without_a_traceback(tmp_path, small_data, tiny_qwen2):
    train_file, _ = small_data
    bad_test = write_jsonl(tmp_path / "test.jsonl", [{"text": "hello", "label": "weather"}])
    result = runner.invoke(app, ["train", "--model", str(tiny_qwen2), "--train", str(train_file), "--test", str(bad_test), "--output", str(tmp_path / "run")])
    assert result.exit_code == EXIT_INPUT
    assert f"{bad_test}:1: unknown label 'weather'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_train_rejects_unknown_config_keys(tmp_path):
    result = runner.invoke(app, ["train", "--set", "train.learning_rate=1"])
    assert result.exit_code == EXIT_INPUT
    assert "unknown key 'train.learning_rate'" in result.output


def test_train_then_merge(tmp_path, small_data, tiny_qwen2):
    train_file, test_file = small_data
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 1\n  precision: fp32\n  lr: 0.005\n", encoding="utf-8")
    run = tmp_path / "run"
    args = ["train", "-c", str(config), "--model", str(tiny_qwen2), "--train", str(train_file), "--test", str(test_file),
            "--batch-size", "4", "--max-train-samples", "30", "--output", str(run), "--set", "lora.r=4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "random_head" in result.output and "lora" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["train"] + metrics["data"]["valid"] == 30
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4

    merged = runner.invoke(app, ["merge", str(run), str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert model.config.id2label == dict(enumerate(metrics["labels"]))

    missing = runner.invoke(app, ["merge", str(tmp_path / "nope"), str(tmp_path / "m2")])
    assert missing.exit_code == EXIT_INPUT and "not a complete run directory" in missing.output


def test_eval_a_run_a_merged_model_and_its_errors(tmp_path, small_data, tiny_qwen2):
    train_file, test_file = small_data
    run = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--model", str(tiny_qwen2), "--train", str(train_file), "--test", str(test_file),
                                  "--epochs", "1", "--precision", "fp32", "--output", str(run), "--set", "eval.baselines=[random_head]"])
    assert trained.exit_code == 0, trained.output
    lora = json.loads((run / "metrics.json").read_text())["lora"]

    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--adapter", str(run), "--data", str(test_file), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["n"] == lora["n"]

    runner.invoke(app, ["merge", str(run), str(tmp_path / "merged")])
    merged = runner.invoke(app, ["eval", "--model", str(tmp_path / "merged"), "--data", str(test_file), "-o", str(out)])
    assert merged.exit_code == 0, merged.output
    assert json.loads(out.read_text())["accuracy"] == lora["accuracy"]  # merged fp32, as in the run's final evaluation

    missing = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "nope"), "--data", str(test_file)])
    assert missing.exit_code == EXIT_INPUT and "not a complete run directory" in missing.output

    other_labels = write_jsonl(tmp_path / "other.jsonl", [{"text": "hello", "label": "weather"}])
    mismatch = runner.invoke(app, ["eval", "--adapter", str(run), "--data", str(other_labels)])
    assert mismatch.exit_code == EXIT_INPUT and f"{other_labels}:1: unknown label 'weather'" in mismatch.output
