"""Experiment tracking through HF Trainer's own integrations (`train.report_to`).

The Trainer's callbacks log per-step loss and learning rate and the
per-epoch validation metrics. What they cannot know comes at the end, from
`finish_run`, into the same run: the final test metrics of LoRA and of every
baseline, the resolved config as parameters, and the report files as
artifacts where the backend has artifacts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# --report-to value -> (module that must import, what pip installs; intentlora's extra of the same name pins it)
BACKENDS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
}
# Trackio finishes its run at the end of training and reopens it by project and name:
# train passes these to TrainingArguments(project=..., run_name=...).
PROJECT = "intentlora"
TENSORBOARD_DIR = "tensorboard"
FINAL_METRICS = ("macro_f1", "accuracy", "weighted_f1")
REPORT_FILES = ("README.md", "report.md", "report.html", "metrics.json", "errors.jsonl", "config.yaml", "labels.json")


class TrackingError(ValueError):
    """--report-to names a backend that is unknown or not installed."""


def check_report_to(report_to: list[str]) -> None:
    """Fail before any work if a backend is unknown or its package is missing (the Trainer would fail after the baselines)."""
    if "none" in report_to and len(report_to) > 1:
        raise TrackingError(f"--report-to none cannot be combined with other backends, got {','.join(report_to)}")
    for name in report_to:
        if name == "none":
            continue
        if name not in BACKENDS:
            raise TrackingError(f"unknown --report-to backend {name!r}; choose from none, {', '.join(BACKENDS)} (comma-separated for several)")
        module, package = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            # No square brackets (the extra's pip syntax): the console reads them as markup.
            raise TrackingError(f"--report-to {name} needs the {package} package: pip install {package} (or intentlora's {name} extra)")


def place_logs(callbacks: list, run_dir: Path) -> None:
    """TensorBoard logs go to RUN/tensorboard, not under checkpoints/ (HF's default), which a finished run deletes.

    Called on the trainer's callbacks before training; TENSORBOARD_LOGGING_DIR, if set, still wins.
    """
    tensorboard = _callback(callbacks, "tensorboard")
    if tensorboard is not None and tensorboard.logging_dir is None:
        tensorboard.logging_dir = str(Path(run_dir) / TENSORBOARD_DIR)


def finish_run(callbacks: list, report_to: list[str], config: dict, metrics: dict, run_dir: Path) -> None:
    """Log the final test metrics, the config and the report files into each backend's training run.

    `callbacks` are the trainer's (trainer.callback_handler.callbacks): each
    integration's callback knows where its run lives. A backend that fails
    here is reported and skipped: the run folder is complete by now, and a
    tracking server being down must not turn a finished run into a failure.
    """
    active = [name for name in report_to if name != "none"]
    if not active:
        return
    run_dir = Path(run_dir)
    params, finals = flat_params(config), final_metrics(metrics)
    files = report_files(run_dir)
    step = int(metrics.get("train", {}).get("steps") or 0)
    loggers = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb, "trackio": _trackio}
    for name in active:
        try:
            loggers[name](_callback(callbacks, name), params, finals, files, step, run_dir)
        except Exception as err:  # noqa: BLE001 - any backend failure: warn, keep the finished run
            log.warning("--report-to %s: could not log the final metrics and files: %s", name, err)


def flat_params(config: dict) -> dict:
    """{"section.key": value} with scalars kept and lists/mappings as JSON, which every backend takes as a parameter."""
    flat = {}
    for section, values in config.items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, ensure_ascii=False)
    return flat


def final_metrics(metrics: dict) -> dict:
    """{"test/lora/macro_f1": ..., "test/tfidf/accuracy": ...}: LoRA and every baseline on the test set."""
    models = {"lora": metrics["lora"], **metrics.get("baselines", {})}
    return {f"test/{name}/{key}": float(m[key]) for name, m in models.items() for key in FINAL_METRICS if key in m}


def report_files(run_dir: Path) -> list[Path]:
    """The run's report, plots, metrics, errors, card and config, those that exist."""
    named = [run_dir / name for name in REPORT_FILES]
    return [f for f in named if f.is_file()] + sorted(run_dir.glob("*.png"))


def _callback(callbacks: list, name: str):
    """The trainer's integration callback for `name` (None if the trainer had none)."""
    from transformers.integrations import integration_utils

    cls = integration_utils.INTEGRATION_TO_CALLBACK[name]
    return next((cb for cb in callbacks if isinstance(cb, cls)), None)


def _tensorboard(callback, params: dict, finals: dict, files: list[Path], step: int, run_dir: Path) -> None:
    """Into the callback's log folder: final metrics as scalars and the config as hyperparameters (HPARAMS tab)."""
    if callback is None or callback.logging_dir is None:
        raise RuntimeError("the trainer has no TensorBoard callback that logged this run")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=callback.logging_dir) as writer:
        # add_hparams logs `finals` as scalars too; run_name "." keeps the hyperparameters in the run's folder, not in a new timestamped run.
        writer.add_hparams({k: str(v) if isinstance(v, bool) else v for k, v in params.items()}, finals, run_name=".", global_step=step)


def _mlflow(callback, params: dict, finals: dict, files: list[Path], step: int, run_dir: Path) -> None:
    """Into the run MLflowCallback started (and ended at the end of training): params, metrics, artifacts."""
    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    run = mlflow.active_run() or mlflow.last_active_run()
    if callback is None or run is None:
        raise RuntimeError("no MLflow run was started by the trainer")
    client, run_id = mlflow.MlflowClient(), run.info.run_id
    values = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
    for i in range(0, len(values), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=values[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    now = mlflow.utils.time.get_current_time_millis()
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in finals.items()])
    for path in files:
        client.log_artifact(run_id, str(path))


def _wandb(callback, params: dict, finals: dict, files: list[Path], step: int, run_dir: Path) -> None:
    """WandbCallback leaves its run open: summary metrics, config, the files as one artifact, then finish it."""
    import wandb

    if wandb.run is None:
        raise RuntimeError("no W&B run was started by the trainer")
    wandb.config.update(params, allow_val_change=True)
    wandb.run.summary.update(finals)
    artifact = wandb.Artifact(f"report-{wandb.run.id}", type="report")
    for path in files:
        artifact.add_file(str(path))
    wandb.run.log_artifact(artifact)
    wandb.finish()


def _trackio(callback, params: dict, finals: dict, files: list[Path], step: int, run_dir: Path) -> None:
    """TrackioCallback finishes its run at the end of training: reopen it by project and name (no artifacts in Trackio)."""
    import trackio

    trackio.init(project=PROJECT, name=run_dir.name, resume="must")
    try:
        trackio.config.update(params)
        trackio.log(finals, step=step)
    finally:
        trackio.finish()
