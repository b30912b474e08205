"""The run folder as a contract: what `train` writes, what `eval`, `predict`, `serve` and `export` read.

    RUN/config.yaml        the resolved config, written when the run starts
    RUN/run.pid            while a process trains into it
    RUN/checkpoints/       checkpoint-N, while unfinished (kept with --keep-checkpoints)
    RUN/adapter/           PEFT adapter + the trained head (safetensors)
    RUN/labels.json        label order of the head's outputs
    RUN/calibration.json   written by `calibrate`
    RUN/metrics.json       written last: a run without it is unfinished

Under torchrun / accelerate launch, rank 0 alone writes; every rank reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, TypeVar

import yaml

from intentlora.config import Config, load_config, save_config
from intentlora.files import write_text_atomic

CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
CALIBRATION_FILE = "calibration.json"
PID_FILE = "run.pid"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
# What a folder written by `export` adds to the transformers files: how texts
# become model inputs (truncation, padding, precision), so `predict` on the
# export scores as the run did.
INFERENCE_FILE = "intentlora.json"
T = TypeVar("T")

# What HF Trainer writes into checkpoint-N for a PEFT model, trainer_state.json
# last; the RNG state is rng_state.pth for one process, rng_state_<rank>.pth
# for each of several. A checkpoint without all of them was cut off.
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


class IncompleteRunError(FileNotFoundError):
    """A run directory that `train` did not finish: its adapter may be half written or untested."""


class ResumeError(ValueError):
    """The output folder holds a run that cannot be continued, or started over, as asked."""


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (both set RANK), or a plain process."""
    return int(os.environ.get("RANK", 0)) == 0


def process_count() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank_zero_decides(decide: Callable[[], T]) -> T:
    """Rank 0's `decide()` on every process of a CPU job (gloo); the others do not call it. For what must not differ
    between processes but may depend on the process that asks, such as a timed choice."""
    if process_count() == 1:
        return decide()
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState(cpu=True)  # joins the process group torchrun set up; the Trainer joins the same group later
    return broadcast_object_list([decide() if is_main_process() else None], from_process=0)[0]


def make_run_dir(path: str | None) -> Path:
    run_dir = Path(path) if path else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# -- what a finished run holds ------------------------------------------------


def write_config(run_dir: Path, cfg: Config) -> None:
    save_config(cfg, run_dir / CONFIG_FILE)


def read_config(run_dir: Path) -> Config:
    """The run's config. A run saved before `data.prompt_template` existed trained on the bare text, whatever the
    default is now."""
    path = Path(run_dir) / CONFIG_FILE
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    bare = isinstance(saved.get("data"), dict) and "prompt_template" not in saved["data"]
    return load_config(path, assignments=[("data.prompt_template", None)] if bare else None)


def write_labels(folder: Path, labels: list[str]) -> None:
    write_text_atomic(Path(folder) / LABELS_FILE, json.dumps(labels, ensure_ascii=False, indent=2))


def read_labels(folder: Path) -> list[str]:
    return json.loads((Path(folder) / LABELS_FILE).read_text(encoding="utf-8"))


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """Last of all: its presence is what makes a run finished."""
    write_text_atomic(run_dir / METRICS_FILE, json.dumps(metrics, indent=2, ensure_ascii=False))


def read_metrics(run_dir: Path) -> dict | None:
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_calibration(folder: Path) -> dict:
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg}); delete it or run `intentlora calibrate` again") from None


def write_calibration(folder: str | Path, calibration: dict) -> Path:
    """calibration.json next to the model, where from_pretrained finds it; written atomically."""
    return write_text_atomic(Path(folder) / CALIBRATION_FILE, json.dumps(calibration, indent=2, ensure_ascii=False))


def inference_settings(cfg: Config) -> dict:
    """How a run turns texts into model inputs (inference.batched_logits' keyword arguments); `export` writes it as
    intentlora.json. The prompt template is part of the model: every entry point wraps each text in it."""
    return {"max_length": cfg.data.max_length, "pad_to_max_length": cfg.train.pad_to_max_length,
            "prompt_template": cfg.data.prompt_template}


def write_inference_settings(folder: Path, settings: dict) -> None:
    write_text_atomic(Path(folder) / INFERENCE_FILE, json.dumps(settings, indent=2, ensure_ascii=False))


def read_inference_settings(folder: Path) -> dict | None:
    path = Path(folder) / INFERENCE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def is_run_dir(path: Path) -> bool:
    """Anything but a model folder (config.json) is taken for a run, so check_run_dir can say what is missing."""
    return not (Path(path) / "config.json").is_file()


def check_run_dir(run_dir: Path) -> None:
    """Refuse folders that are not runs, and runs that `train` did not finish (metrics.json is written last)."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).is_file() and not (run_dir / METRICS_FILE).is_file():
        raise IncompleteRunError(
            f"{run_dir}: incomplete run (no metrics.json): training did not finish or crashed, "
            "so the adapter may be partial or failed its parity check; train again, or resume it"
        )
    for required in (CONFIG_FILE, LABELS_FILE, f"{ADAPTER_DIR}/adapter_config.json"):
        if not (run_dir / required).is_file():
            raise IncompleteRunError(f"{run_dir}: not a complete run directory (missing {required})")


# -- running, finished, unfinished -----------------------------------------


@contextmanager
def running(run_dir: Path):
    """run.pid while this process trains into `run_dir`; gone when it ends, however it ends but SIGKILL."""
    pid_file = run_dir / PID_FILE
    write_text_atomic(pid_file, str(os.getpid()))
    try:
        yield
    finally:
        pid_file.unlink(missing_ok=True)


def run_status(run_dir: Path) -> str:
    """finished (metrics.json), running (its pid is alive), or unfinished (resumable)."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS_FILE).is_file():
        return "finished"
    try:
        pid = int((run_dir / PID_FILE).read_text().strip())
        os.kill(pid, 0)
        return "running"
    except (OSError, ValueError):  # no pid file, a dead process (killed: the file stayed), or not ours to signal
        return "unfinished"


# -- checkpoints and resuming -------------------------------------------------


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR


def remove_checkpoints(run_dir: Path) -> None:
    """A finished run needs no checkpoints: resuming is for unfinished ones."""
    shutil.rmtree(checkpoints_dir(run_dir), ignore_errors=True)


def is_complete_checkpoint(folder: Path) -> bool:
    if not all((folder / name).is_file() for name in CHECKPOINT_FILES):
        return False
    if not (folder / "rng_state.pth").is_file() and not any(folder.glob("rng_state_*.pth")):
        return False
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict)


def checkpoint_step(folder: Path) -> int:
    """N of checkpoint-N; -1 for a folder not named so."""
    tail = folder.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def last_checkpoint(checkpoints: Path) -> Path | None:
    complete = [folder for folder in checkpoints.glob("checkpoint-*") if is_complete_checkpoint(folder)]
    return max(complete, key=checkpoint_step, default=None)


def resume_point(run_dir: Path, cfg: Config, resume: bool, echo=print) -> Path | None:
    """The checkpoint to continue from, or None to start afresh.

    An unfinished run (checkpoints, no metrics.json) is continued only when
    asked, and only with the config it started with; without `resume` it is
    refused, not overwritten. A finished run started over loses its
    metrics.json first, so the folder never looks complete half-way through,
    and its checkpoints, which HF Trainer would take for the newest.
    """
    checkpoints = checkpoints_dir(run_dir)
    finished = (run_dir / METRICS_FILE).is_file()
    unfinished = not finished and any(checkpoints.glob("checkpoint-*"))
    if not resume:
        if unfinished:
            raise ResumeError(f"{run_dir} holds an unfinished run (checkpoints but no metrics.json): resume it, or choose another output folder")
        if is_main_process():
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
            remove_checkpoints(run_dir)
        return None
    if finished:
        raise ResumeError(f"{run_dir} is a finished run (it has metrics.json): nothing to resume")
    if not is_main_process():  # rank 0 checks, cleans up and fixes the state; the others only read
        return last_checkpoint(checkpoints)
    check_same_config(run_dir, cfg)
    for folder in checkpoints.glob("checkpoint-*"):
        if not is_complete_checkpoint(folder):
            echo(f"removing {folder}: incomplete (cut off while being written)")
            shutil.rmtree(folder)
    checkpoint = last_checkpoint(checkpoints)
    if checkpoint is None:
        echo(f"nothing to resume in {run_dir}: starting from the beginning")
        return None
    relocate_best_checkpoint(checkpoint)
    echo(f"resuming from {checkpoint}")
    return checkpoint


def relocate_best_checkpoint(checkpoint: Path) -> None:
    """Point the saved state's best checkpoint into this folder.

    trainer_state.json names it by the path it had when saved; if the run
    folder moved (or a relative --output meets another working directory),
    HF Trainer would forget it and ship the last weights instead of the best.
    """
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("best_model_checkpoint"):
        state["best_model_checkpoint"] = str(checkpoint.parent / Path(state["best_model_checkpoint"]).name)
        write_text_atomic(state_file, json.dumps(state, indent=2))  # never half-written: that would make it incomplete


def check_same_config(run_dir: Path, cfg: Config) -> None:
    """Resuming with another config would mix two runs in one adapter."""
    if not (run_dir / CONFIG_FILE).is_file():
        return
    before, now = flat_config(read_config(run_dir)), flat_config(cfg)
    changed = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]
    if changed:
        raise ResumeError(f"{run_dir} was started with another config; resume with the same settings, or choose another output folder. Changed: {'; '.join(changed)}")


# Settings that may change between the start and a resume of one run: where it
# lives, what the console shows, whether checkpoints are kept at the end.
RESUMABLE_CHANGES = ("output.dir", "output.keep_checkpoints")


def flat_config(cfg: Config) -> dict:
    """{"section.key": value}, without the settings a resume may change."""
    flat = {f"{section}.{key}": value for section, values in dataclasses.asdict(cfg).items() for key, value in values.items()}
    return {key: value for key, value in flat.items() if key not in RESUMABLE_CHANGES}
