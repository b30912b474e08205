import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from intentlora import IntentClassifier
from intentlora.cli import EXIT_INPUT, EXIT_USAGE, app
from tests.bad_inputs import CASES, LABELS, materialize
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
            "--batch-size", "4", "--max-train-samples", "30", "--output", str(run), "--set", "lora.r=4", "--lora-top-layers", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "random_head" in result.output and "lora" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["train"] + metrics["data"]["valid"] == 30
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["layers_to_transform"] == [1]  # the last of tiny_qwen2's 2 layers

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
    assert missing.exit_code == EXIT_INPUT and "no such run directory or model folder" in missing.output

    other_labels = write_jsonl(tmp_path / "other.jsonl", [{"text": "hello", "label": "weather"}])
    mismatch = runner.invoke(app, ["eval", "--adapter", str(run), "--data", str(other_labels)])
    assert mismatch.exit_code == EXIT_INPUT and f"{other_labels}:1: unknown label 'weather'" in mismatch.output


TEXTS = ["查余额", "我的信用卡昨天在地铁上丢了，怎么挂失", "退款 [bold]please[/bold]", "有人冒充客服让我转账"]


def probabilities(prediction: dict) -> dict[str, float]:
    return {t["label"]: t["score"] for t in prediction["top_k"]}


def assert_matches_api(predictions: list[dict], expected) -> None:
    assert [p["label"] for p in predictions] == [e.label for e in expected]
    for p, e in zip(predictions, expected):
        assert probabilities(p) == pytest.approx(probabilities(e.to_dict()), abs=1e-5)


def test_predict_texts_and_files_match_the_api_on_a_run_and_its_export(tiny_run, tiny_export, tmp_path):
    expected = IntentClassifier.from_pretrained(tiny_run).predict(TEXTS, top_k=5)
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    for model in (tiny_run, tiny_export):
        result = runner.invoke(app, ["predict", "--model", str(model), "--top-k", "5", "--json", *TEXTS])
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert [line["text"] for line in lines] == TEXTS
        assert_matches_api(lines, expected)

        out = tmp_path / "out.jsonl"
        streamed = runner.invoke(app, ["predict", "-m", str(model), "-i", str(source), "-o", str(out), "--top-k", "5", "--batch-size", "3"])
        assert streamed.exit_code == 0, streamed.output
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [r["id"] for r in rows] == [0, 1, 2, 3]
        assert_matches_api([r["prediction"] for r in rows], expected)
        assert "4 row(s) predicted, 0 bad line(s)" in streamed.stderr


def test_predict_prints_a_table_with_fallbacks(tiny_run):
    result = runner.invoke(app, ["predict", "-m", str(tiny_run), "--top-k", "2", "--threshold", "1", *TEXTS])
    assert result.exit_code == 0, result.output
    for column in ("text", "label", "score", "top-k"):
        assert column in result.stdout
    assert "[bold]please[/bold]" in result.stdout  # texts are shown as they are, never as markup
    assert result.stdout.count("other (fallback)") == len(TEXTS)


def test_predict_reports_bad_lines_and_writes_the_good_ones(tiny_run, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"text": "\xe6\x9f\xa5\xe4\xbd\x99\xe9\xa2\x9d"}\nnot json\n{"text": 3}\n\xff\n{"msg": "x"}\n{"msg": "\xe9\x80\x80\xe6\xac\xbe"}\n')
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["predict", "-m", str(tiny_run), "-i", str(source), "-o", str(out)])
    assert result.exit_code == EXIT_INPUT
    for line, message in ((2, "invalid JSON"), (3, "field 'text' must be a string, got number"), (4, "not valid UTF-8"), (5, "missing field 'text'"), (6, "missing field 'text'")):
        assert f"{source}:{line}: {message}" in result.stderr
    assert "1 row(s) predicted, 5 bad line(s) skipped" in result.stderr
    assert "Traceback" not in result.output
    assert [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()] == ["查余额"]

    by_field = runner.invoke(app, ["predict", "-m", str(tiny_run), "-i", str(source), "-o", str(out), "--text-field", "msg"])
    assert by_field.exit_code == EXIT_INPUT and "2 row(s) predicted" in by_field.stderr

    strict_out = tmp_path / "strict.jsonl"
    strict = runner.invoke(app, ["predict", "-m", str(tiny_run), "-i", str(source), "-o", str(strict_out), "--strict"])
    assert strict.exit_code == EXIT_INPUT
    assert f"{source}:2: invalid JSON" in strict.stderr and f"{source}:3:" not in strict.stderr
    assert not strict_out.exists() and list(tmp_path.glob(".strict*")) == []


def test_predict_precision_flag(tiny_run):
    expected = IntentClassifier.from_pretrained(tiny_run, dtype="bf16").predict(TEXTS, top_k=5)
    result = runner.invoke(app, ["predict", "-m", str(tiny_run), "--precision", "bf16", "--top-k", "5", "--json", *TEXTS])
    assert result.exit_code == 0, result.output
    assert_matches_api([json.loads(line) for line in result.stdout.splitlines()], expected)
    bad = runner.invoke(app, ["predict", "-m", str(tiny_run), "--precision", "fp8", "hello"])
    assert bad.exit_code == EXIT_INPUT and "precision must be auto, bf16 or fp32, got 'fp8'" in bad.stderr


def test_predict_usage_and_input_errors(tiny_run, tmp_path):
    assert runner.invoke(app, ["predict", "-m", str(tiny_run)]).exit_code == EXIT_USAGE
    assert runner.invoke(app, ["predict", "-m", str(tiny_run), "-i", str(tmp_path / "x.jsonl")]).exit_code == EXIT_USAGE
    missing = runner.invoke(app, ["predict", "-m", str(tiny_run), "-i", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "y.jsonl")])
    assert missing.exit_code == EXIT_INPUT and "file not found" in missing.stderr
    no_model = runner.invoke(app, ["predict", "-m", str(tmp_path / "nope"), "hello"])
    assert no_model.exit_code == EXIT_INPUT and "no such run directory" in no_model.stderr
    assert "Traceback" not in no_model.output


def test_calibrate_then_export_carries_the_threshold(tiny_run, tmp_path, bundled_rows):
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    data = write_jsonl(tmp_path / "valid.jsonl", bundled_rows["test"][25:85])
    result = runner.invoke(app, ["calibrate", str(run), "--data", str(data), "--target-precision", "0.3"])
    assert result.exit_code == 0, result.output
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["precision"] >= 0.3 and calibration["fallback_label"] == "other" and calibration["n"] == 60
    assert f"precision {calibration['precision']:.4f}" in result.stdout and f"coverage {calibration['coverage']:.4f}" in result.stdout

    exported = runner.invoke(app, ["export", str(run), str(tmp_path / "merged")])
    assert exported.exit_code == 0, exported.output
    merged = tmp_path / "merged"
    assert json.loads((merged / "calibration.json").read_text()) == calibration
    assert json.loads((merged / "labels.json").read_text()) == json.loads((run / "labels.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert model.config.id2label[3] == "other" and model.config.pad_token_id is not None
    assert AutoTokenizer.from_pretrained(merged).model_max_length == 128  # the run's truncation length
    texts = [r["text"] for r in bundled_rows["test"][25:85]]
    assert_matches_api([p.to_dict() for p in IntentClassifier.from_pretrained(merged).predict(texts)],
                       IntentClassifier.from_pretrained(run).predict(texts))


def test_calibrate_refuses_unreachable_targets_and_bad_data(tiny_run, tmp_path, bundled_rows):
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    oos = write_jsonl(tmp_path / "oos.jsonl", [{"text": r["text"], "label": "out_of_scope"} for r in bundled_rows["test"][:10]])
    result = runner.invoke(app, ["calibrate", str(run), "--data", str(oos), "--fallback-label", "out_of_scope"])
    assert result.exit_code == EXIT_INPUT and "no threshold reaches precision 0.95" in result.stderr
    assert not (run / "calibration.json").exists()
    unknown = runner.invoke(app, ["calibrate", str(run), "--data", str(oos)])
    assert unknown.exit_code == EXIT_INPUT and f"{oos}:1: unknown label 'out_of_scope'" in unknown.stderr


def assert_clean_exit(result, code: int) -> None:
    """The exit code, and no Python exception escaped (CliRunner keeps it in `exception`; a traceback would print)."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_validate_reports_each_bad_input(case, tmp_path):
    path = materialize(case, tmp_path)
    result = runner.invoke(app, ["validate", str(path), "--labels", ",".join(LABELS)])
    assert_clean_exit(result, 0 if case.accepted else EXIT_INPUT)
    for line in case.expected_lines(path):
        assert line in result.output
    assert f"{case.examples} valid rows in 1 file(s), {len(case.problems)} error(s)" in result.output


@pytest.mark.parametrize("case", [c for c in CASES if not c.accepted], ids=lambda c: c.name)
def test_train_refuses_each_bad_input_before_loading_the_model(case, tmp_path, small_data):
    """Bad training data stops `train` with the same FILE:LINE messages; the model path is never opened."""
    path = materialize(case, tmp_path)
    _, test_file = small_data
    args = ["train", "--model", str(tmp_path / "no-model"), "--train", str(path), "--test", str(test_file),
            "--labels", ",".join(LABELS), "--output", str(tmp_path / "run")]
    result = runner.invoke(app, args)
    assert_clean_exit(result, EXIT_INPUT)
    assert f"{len(case.problems)} problem(s) in the data" in result.output
    for line in case.expected_lines(path):
        assert line in result.output
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_pickle_weights_need_allow_pickle_in_every_command(tmp_path, small_data, pickled_qwen2):
    """Refused with the reason and the way out (exit 1, no traceback); --allow-pickle loads them, with a warning."""
    train_file, test_file = small_data
    run = tmp_path / "run"
    args = ["train", "--model", str(pickled_qwen2), "--train", str(train_file), "--test", str(test_file), "--epochs", "1",
            "--precision", "fp32", "--output", str(run), "--set", "eval.baselines=[]"]
    refused = runner.invoke(app, args)
    assert_clean_exit(refused, EXIT_INPUT)
    assert "pickle files only (pytorch_model.bin)" in refused.output and "--allow-pickle" in refused.output
    allowed = runner.invoke(app, [*args, "--allow-pickle"])
    assert_clean_exit(allowed, 0)
    assert "warning: allow_pickle is on" in allowed.output

    for command in (["eval", "--adapter", str(run), "--data", str(test_file)], ["predict", "-m", str(run), "查余额"],
                    ["export", str(run), str(tmp_path / "merged")]):
        assert_clean_exit(runner.invoke(app, command), EXIT_INPUT)  # a run's base is checked again: run folders travel
        assert_clean_exit(runner.invoke(app, [*command, "--allow-pickle"]), 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_load_in_4bit_without_cuda_fails_before_any_loading(tmp_path):
    """The data and model paths do not exist: the error has to come first, and nothing is written."""
    result = runner.invoke(app, ["train", "--load-in-4bit", "--model", str(tmp_path / "m"), "--train", str(tmp_path / "t.jsonl"),
                                 "--output", str(tmp_path / "run")])
    assert_clean_exit(result, EXIT_INPUT)
    assert "--load-in-4bit (model.load_in_4bit) needs a CUDA GPU" in result.output
    assert not (tmp_path / "run").exists()


def test_remote_code_and_pickle_are_off_unless_asked_and_warned_when_on(tmp_path):
    from intentlora.config import load_config

    assert (load_config().model.trust_remote_code, load_config().model.allow_pickle) == (False, False)
    result = runner.invoke(app, ["train", "--trust-remote-code", "--allow-pickle", "--train", str(tmp_path / "none.jsonl")])
    assert_clean_exit(result, EXIT_INPUT)  # stops at the missing file, after the warnings
    assert "warning: trust_remote_code is on" in result.output and "warning: allow_pickle is on" in result.output


def row_lines(output: str, path) -> list[str]:
    """The FILE:LINE: lines of `path` in `output`."""
    return [line for line in output.splitlines() if re.match(rf"{re.escape(str(path))}:\d+: ", line)]


def other_label_set(tmp_path, rows: int = 3080):
    """A file whose labels are not the bundled five: two new ones, and one row of a known label."""
    return write_jsonl(tmp_path / "other.jsonl", [{"text": f"text {i}", "label": ["weather", "music"][i % 2]} for i in range(rows)]
                       + [{"text": "查余额", "label": "balance"}])


def test_validate_summarizes_another_label_set(tmp_path):
    """Both label sets, rows per unknown label, the first 20 row lines and how many more; --all lists them all."""
    other = other_label_set(tmp_path)
    result = runner.invoke(app, ["validate", str(other), "--labels", ",".join(LABELS)])
    assert_clean_exit(result, EXIT_INPUT)
    for line in (f"{other}: 3,080 row(s) with a label outside --labels", f"  --labels (5): {', '.join(LABELS)}",
                 f"  labels in {other} (3): balance, music, weather", "  rows per unknown label: 'weather' 1,540, 'music' 1,540",
                 "... and 3,060 more (--all prints them)", "1 valid rows in 1 file(s), 3080 error(s), 0 warning(s)"):
        assert line in result.output.splitlines(), line
    assert row_lines(result.stdout, other) == [f"{other}:{n}: unknown label '{['weather', 'music'][(n - 1) % 2]}'" for n in range(1, 21)]
    everything = runner.invoke(app, ["validate", str(other), "--labels", ",".join(LABELS), "--all"])
    assert len(row_lines(everything.stdout, other)) == 3080 and "more" not in everything.stdout


def test_train_summarizes_a_test_file_of_another_label_set(tmp_path, small_data):
    """Refused before any model loads (the model path does not exist), with the training file's labels shown."""
    train_file, _ = small_data
    other = other_label_set(tmp_path)
    result = runner.invoke(app, ["train", "--model", str(tmp_path / "no-model"), "--train", str(train_file), "--test", str(other),
                                 "--output", str(tmp_path / "run")])
    assert_clean_exit(result, EXIT_INPUT)
    labels = sorted({json.loads(line)["label"] for line in train_file.read_text(encoding="utf-8").splitlines()})
    lines = result.output.splitlines()
    start = lines.index("error: 3,080 problem(s) in the data:")  # after the [data] phase line
    assert lines[start + 1:start + 5] == [f"{other}: 3,080 row(s) with a label outside the training file's labels",
                          f"  the training file's labels ({len(labels)}): {', '.join(labels)}",
                          f"  labels in {other} (3): balance, music, weather", "  rows per unknown label: 'weather' 1,540, 'music' 1,540"]
    assert len(row_lines(result.output, other)) == 20 and lines[-1] == "... and 3,060 more"


def test_eval_and_calibrate_summarize_another_label_set(tiny_run, tmp_path):
    """The header points at the label sets printed under it, never at text that is not there."""
    other = other_label_set(tmp_path, rows=30)
    labels = json.loads((tiny_run / "labels.json").read_text(encoding="utf-8"))
    evaluated = runner.invoke(app, ["eval", "--adapter", str(tiny_run), "--data", str(other)])
    assert_clean_exit(evaluated, EXIT_INPUT)
    assert "see above" not in evaluated.output
    lines = evaluated.output.splitlines()
    start = lines.index("error: 30 problem(s) in the data:")
    assert lines[start:start + 4] == ["error: 30 problem(s) in the data:", f"{other}: 30 row(s) with a label outside the model's labels",
                         f"  the model's labels ({len(labels)}): {', '.join(labels)}", f"  labels in {other} (3): balance, music, weather"]
    assert len(row_lines(evaluated.output, other)) == 20 and lines[-1] == "... and 10 more"

    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    calibrated = runner.invoke(app, ["calibrate", str(run), "--data", str(other)])
    assert_clean_exit(calibrated, EXIT_INPUT)
    assert f"{other}: 30 row(s) with a label outside the model's labels and the fallback label" in calibrated.output
    assert "  rows per unknown label: 'weather' 15, 'music' 15" in calibrated.output and not (run / "calibration.json").exists()
