"""--report-to: the Trainer's integrations log the curves, finish_run adds the final test metrics, config and files (offline)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from intentlora.tracking import TrackingError, check_report_to, finish_run

from tests.conftest import tiny_config, write_jsonl

pytest.importorskip("tensorboard", reason="pip install -e '.[tensorboard]'")
mlflow = pytest.importorskip("mlflow", reason="pip install -e '.[mlflow]'")


@pytest.fixture(scope="module")
def tracked_run(tiny_qwen2, bundled_rows, tmp_path_factory) -> tuple[Path, dict, str]:
    """One tiny training reported to TensorBoard and to an MLflow file store: (run dir, metrics, tracking URI)."""
    from intentlora.train import train

    folder = tmp_path_factory.mktemp("tracked")
    uri = f"file:{folder / 'mlruns'}"
    train_file = write_jsonl(folder / "train.jsonl", bundled_rows["train"][:40])
    test_file = write_jsonl(folder / "test.jsonl", bundled_rows["test"][:20])
    cfg = tiny_config(tiny_qwen2, train_file, test_file, folder / "run", **{"eval.baselines": ["tfidf"], "train.report_to": ["tensorboard", "mlflow"]})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a folder is enough here
        result = train(cfg, echo=lambda _: None)
    return result.run_dir, result.metrics, uri


def test_check_report_to_names_backends_and_extras():
    check_report_to(["none"])
    check_report_to(["tensorboard", "mlflow"])
    with pytest.raises(TrackingError, match="unknown --report-to backend 'comet'; choose from none, tensorboard, mlflow, trackio, wandb"):
        check_report_to(["comet"])
    with pytest.raises(TrackingError, match="cannot be combined"):
        check_report_to(["none", "tensorboard"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_backend_names_its_pip_extra():
    with pytest.raises(TrackingError, match=r"--report-to wandb needs the wandb package: pip install wandb \(or intentlora's wandb extra\)"):
        check_report_to(["wandb"])


def test_tensorboard_holds_curves_validation_f1_and_final_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics, _ = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = lambda tag: [e.value for e in events.Scalars(tag)]  # noqa: E731  (float32)
    assert len(scalars("train/loss")) >= 2 and scalars("train/learning_rate")
    history = [e["eval_macro_f1"] for e in metrics["train"]["log_history"] if "eval_macro_f1" in e]
    assert len(history) == 2 and scalars("eval/macro_f1") == pytest.approx(history, abs=1e-6)  # one validation per epoch
    for model, scores in {"lora": metrics["lora"], "tfidf": metrics["baselines"]["tfidf"]}.items():
        for key in ("macro_f1", "accuracy", "weighted_f1"):
            assert scalars(f"test/{model}/{key}") == pytest.approx([scores[key]], abs=1e-6)


def test_mlflow_run_holds_params_final_metrics_and_artifacts(tracked_run):
    run_dir, metrics, uri = tracked_run
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(experiment_ids=["0"])  # the Trainer's run, completed, not a second one
    params, logged = run.data.params, run.data.metrics
    assert params["train.lr"] == "0.005" and params["data.max_length"] == "128" and params["eval.baselines"] == '["tfidf"]'
    assert logged["test/lora/macro_f1"] == pytest.approx(metrics["lora"]["macro_f1"])
    assert logged["test/tfidf/accuracy"] == pytest.approx(metrics["baselines"]["tfidf"]["accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "eval_macro_f1")) == 2  # per epoch, from the Trainer
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    expected = {"report.md", "report.html", "metrics.json", "errors.jsonl", "README.md", "confusion_matrix.png", "training_curves.png"}
    assert expected <= artifacts


def test_no_tracking_leaves_no_logs(tiny_run):
    assert not (tiny_run / "tensorboard").exists()


def test_a_failing_backend_warns_and_keeps_the_run(tmp_path, caplog):
    metrics = {"lora": {"macro_f1": 0.5, "accuracy": 0.5, "weighted_f1": 0.5}, "baselines": {}, "train": {"steps": 3}}
    with caplog.at_level(logging.WARNING, logger="intentlora.tracking"):
        finish_run([], ["tensorboard"], {"train": {"lr": 0.1}}, metrics, tmp_path)  # the trainer had no TensorBoard callback
    assert "--report-to tensorboard: could not log" in caplog.text
