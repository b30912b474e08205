"""`intentlora ui`: a web page to train runs, compare them and try them, served by our own FastAPI app.

Why not Gradio: this page shares `serve`'s process model and API-key check,
adds no dependency, and drives the same `train` command as the terminal.
Training runs `python -m intentlora.cli train ... --output RUNS/NAME` in a
subprocess, so the run folder is exactly what the CLI writes, a crash or a
cancel never takes the UI down, and a cancelled run stays resumable. One
training runs at a time per machine (a file lock); the others wait in order.
The page polls `/api/jobs/{id}` for the subprocess's JSON log events.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import yaml
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from intentlora.config import BUNDLED_DATA, TRAINING_PRECISIONS as PRECISIONS, Config
from intentlora.serve import RequestGate, api_key_checker

STATIC = Path(__file__).parent / "ui_static"
UI_DIR = ".ui"  # inside --runs: uploaded files; the run listing skips it
LOOPBACK = ("127.0.0.1", "localhost", "::1")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
RUN_FILES = ("report.html", "report.md", "confusion_matrix.png", "training_curves.png", "confidence_histogram.png",
             "errors.jsonl", "metrics.json", "config.yaml", "labels.json")
BASELINES = ("random_head", "zero_shot", "tfidf")
MAX_UPLOAD_BYTES = 64 * 2**20
STOP_GRACE_S = 10  # SIGTERM, then SIGKILL after this long
LOG_LINES = 300  # plain (non-JSON) output lines kept per job
DEFAULT_LOCK = Path(tempfile.gettempdir()) / "intentlora-ui-train.lock"


# ---------------------------------------------------------------- runs on disk


def safe_name(name: str, what: str = "run name") -> str:
    if not NAME.match(name):
        raise HTTPException(422, f"{what} {name!r}: use letters, digits, '.', '_' and '-' (at most 100, not starting with '.')")
    return name


def run_folder(runs_dir: Path, name: str) -> Path:
    folder = runs_dir / safe_name(name)
    if not (folder / "config.yaml").is_file():
        raise HTTPException(404, f"no run {name!r} in {runs_dir}")
    return folder


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def run_state(run_dir: Path, live: set[str]) -> str:
    """finished (metrics.json, written last), running (a pid file's live process, or this UI's), or unfinished."""
    from intentlora.rundir import run_status

    status = run_status(run_dir)
    return "running" if status == "unfinished" and run_dir.name in live else status


def run_summary(run_dir: Path, live: set[str]) -> dict:
    """One row of the Runs table."""
    cfg, metrics = read_config(run_dir), read_json(run_dir / "metrics.json") or {}
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    labels = metrics.get("labels") or read_json(run_dir / "labels.json") or data.get("labels") or []
    counts = metrics.get("data") or {}
    return {
        "name": run_dir.name,
        "date": datetime.fromtimestamp((run_dir / "config.yaml").stat().st_mtime).isoformat(timespec="seconds"),
        "model": model.get("name"),
        "train_file": data.get("train"),
        "test_file": data.get("test"),
        "n_train": counts.get("train"),
        "n_test": counts.get("test"),
        "labels": labels,
        "baselines": {name: m.get("macro_f1") for name, m in (metrics.get("baselines") or {}).items()},
        "lora_macro_f1": (metrics.get("lora") or {}).get("macro_f1"),
        "seconds": (metrics.get("train") or {}).get("seconds"),
        "status": run_state(run_dir, live),
        "has_report": (run_dir / "report.html").is_file(),
    }


def list_runs(runs_dir: Path, live: set[str]) -> list[dict]:
    """Every run folder directly under `runs_dir` (a folder with config.yaml), newest first."""
    if not runs_dir.is_dir():
        return []
    folders = [f for f in runs_dir.iterdir() if not f.name.startswith(".") and (f / "config.yaml").is_file()]
    return sorted((run_summary(f, live) for f in folders), key=lambda r: r["date"], reverse=True)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"section.key": value} of a config.yaml, lists and mappings kept whole."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:
            flat.update(flatten(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_diff(configs: list[dict]) -> list[dict]:
    """The config keys whose values differ between runs (output.dir always does), one value per run."""
    flats = [flatten(c) for c in configs]
    keys = sorted(set().union(*flats) - {"output.dir"})
    return [{"key": k, "values": [f.get(k) for f in flats]} for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1]


def compare_runs(runs_dir: Path, names: list[str]) -> dict:
    """Side by side: test metrics of every model, per-class F1, and the config diff."""
    if len(names) < 2:
        raise HTTPException(422, "select two or more runs to compare")
    folders = [run_folder(runs_dir, name) for name in names]
    runs = []
    for folder in folders:
        metrics = read_json(folder / "metrics.json")
        if metrics is None:
            raise HTTPException(409, f"run {folder.name!r} is not finished (no metrics.json): nothing to compare yet")
        models = {**metrics.get("baselines", {}), "lora": metrics["lora"]}
        runs.append({
            "name": folder.name,
            "metrics": {m: {k: v.get(k) for k in ("macro_f1", "accuracy", "weighted_f1")} for m, v in models.items()},
            "per_class_f1": {label: c["f1"] for label, c in metrics["lora"].get("per_class", {}).items()},
        })
    return {"runs": runs, "config_diff": config_diff([read_config(f) for f in folders])}


# ---------------------------------------------------------------- data files


def check_files(train: str, test: str | None, valid: str | None = None, labels: list[str] | None = None) -> dict:
    """`intentlora validate --all TRAIN TEST VALID`: its lines (label sets, then FILE:LINE: message) and summary.

    `problems` holds each problem alone, for programs.
    """
    from intentlora.data import label_counts, load_file, overlap_warnings, summarize

    paths = [p for p in (train, test, valid) if p]
    results = [load_file(p, labels) for p in paths]
    problems = [p for r in results for p in r.problems]
    for later in results[1:]:
        problems += overlap_warnings(results[0].examples, later.examples)
    errors = sum(p.severity == "error" for p in problems)
    found = {r.source: label_counts(r) for r in results}
    return {
        "lines": summarize(problems, "--labels", found, None).splitlines() if problems else [],
        "problems": [{"message": str(p), "severity": p.severity} for p in problems],
        "errors": errors,
        "warnings": len(problems) - errors,
        "labels": sorted({ex.label for ex in results[0].examples}),
        "summary": f"{sum(len(r.examples) for r in results)} valid rows in {len(paths)} file(s), {errors} error(s), {len(problems) - errors} warning(s)",
    }


def save_upload(uploads: Path, filename: str, content_base64: str) -> Path:
    """Store an uploaded file's bytes under its own name; a different file of the same name gets -2, -3, ..."""
    name = safe_name(Path(filename).name, "file name")
    if Path(name).suffix.lower() not in (".jsonl", ".csv", ".json"):
        raise HTTPException(422, f"{name}: upload a .jsonl or .csv file")
    try:
        data = base64.b64decode(content_base64, validate=True)
    except binascii.Error as error:
        raise HTTPException(422, f"{name}: content_base64 is not base64 ({error})") from None
    uploads.mkdir(parents=True, exist_ok=True)
    stem, suffix, n = Path(name).stem, Path(name).suffix, 1
    target = uploads / name
    while target.exists() and target.read_bytes() != data:
        n += 1
        target = uploads / f"{stem}-{n}{suffix}"
    if not target.exists():
        target.write_bytes(data)
    return target


def known_files(runs_dir: Path) -> list[str]:
    """Files to pick from: uploads, the bundled data, and the data of existing runs (those still on disk)."""
    files = sorted(str(p) for p in (runs_dir / UI_DIR / "uploads").glob("*") if p.is_file())
    files += [str(BUNDLED_DATA / "train.jsonl"), str(BUNDLED_DATA / "test.jsonl")]
    for run in list_runs(runs_dir, set()):
        files += [f for f in (run["train_file"], run["test_file"]) if f]
    return [f for f in dict.fromkeys(files) if Path(f).is_file()]


# ---------------------------------------------------------------- training jobs


DEFAULTS = Config()  # the form starts from `train`'s own defaults


class TrainRequest(BaseModel):
    name: str | None = Field(None, description="Run folder name under --runs (default: a timestamp).")
    model: str = DEFAULTS.model.name
    train: str
    test: str
    valid: str | None = None
    labels: list[str] | None = None
    epochs: float = Field(DEFAULTS.train.epochs, gt=0)
    lr: float = Field(DEFAULTS.train.lr, gt=0)
    batch_size: int = Field(DEFAULTS.train.batch_size, ge=1)
    lora_r: int = Field(DEFAULTS.lora.r, ge=1, description="LoRA rank; alpha is set to twice it, as the defaults have it.")
    lora_targets: list[str] | None = Field(DEFAULTS.lora.target_modules, description="['all-linear'], None (the architecture's q/v), or module names.")
    precision: str = DEFAULTS.train.precision
    baselines: list[str] = DEFAULTS.eval.baselines
    max_train_samples: int | None = Field(None, ge=1)


def yaml_list(items: list[str]) -> str:
    """A list as one `--set` value: [a,b] (flow YAML, which config.parse_assignment reads)."""
    return "[" + ",".join(items) + "]"


def train_argv(req: TrainRequest, run_dir: Path) -> list[str]:
    """The CLI command for a request: what a user would type, so the run folder is the CLI's."""
    argv = [sys.executable, "-m", "intentlora.cli", "train", "--model", req.model,
            "--train", str(Path(req.train).resolve()), "--test", str(Path(req.test).resolve()),
            "--epochs", str(req.epochs), "--lr", str(req.lr), "--batch-size", str(req.batch_size),
            "--precision", req.precision, "--output", str(run_dir),
            "--set", f"lora.r={req.lora_r}", "--set", f"lora.alpha={2 * req.lora_r}",
            "--set", f"lora.target_modules={yaml_list(req.lora_targets) if req.lora_targets else 'null'}",
            "--set", f"eval.baselines={yaml_list(req.baselines)}"]
    if req.valid:
        argv += ["--valid", str(Path(req.valid).resolve())]
    if req.labels:
        argv += ["--labels", ",".join(req.labels)]
    if req.max_train_samples:
        argv += ["--max-train-samples", str(req.max_train_samples)]
    return argv + ["--log-format", "json"]


def resume_argv(run_dir: Path) -> list[str]:
    """`train --resume` with the run's own config.yaml: the same settings, from its last complete checkpoint."""
    argv = [sys.executable, "-m", "intentlora.cli", "train", "--config", str(run_dir / "config.yaml"),
            "--output", str(run_dir), "--resume", "--log-format", "json"]
    return argv


def check_request(req: TrainRequest) -> None:
    if req.precision not in PRECISIONS:
        raise HTTPException(422, f"precision {req.precision!r}: choose from {', '.join(PRECISIONS)}")
    unknown = sorted(set(req.baselines) - set(BASELINES))
    if unknown:
        raise HTTPException(422, f"unknown baseline(s) {', '.join(unknown)}: choose from {', '.join(BASELINES)}")
    if req.lora_targets is not None and not req.lora_targets:
        raise HTTPException(422, "LoRA targets: give module names (e.g. q_proj,v_proj), or none for the architecture's default")
    if not req.model.strip():
        raise HTTPException(422, "give a model: a hub id, a folder, a .gguf file or pypi:NAME")


@dataclasses.dataclass
class Job:
    id: str
    name: str
    run_dir: Path
    argv: list[str]
    state: str = "queued"  # queued | running | finished | failed | cancelled
    events: list[dict] = dataclasses.field(default_factory=list)  # JSON events and plain output lines, in order
    progress: dict = dataclasses.field(default_factory=dict)  # the latest progress event per bar
    log_lines: list[int] = dataclasses.field(default_factory=list)  # where the plain lines are in `events`
    returncode: int | None = None
    process: subprocess.Popen | None = None

    def summary(self) -> dict:
        phases = [e for e in self.events if e.get("event") == "phase"]
        result = next((e for e in reversed(self.events) if e.get("event") == "result"), None)
        return {"id": self.id, "name": self.name, "state": self.state, "returncode": self.returncode,
                "phase": phases[-1].get("phase") if phases else None, "progress": self.progress,
                "lora_macro_f1": ((result or {}).get("metrics") or {}).get("lora", {}).get("macro_f1"),
                "command": " ".join(self.argv[1:]), "n_events": len(self.events)}


def parse_line(line: str) -> dict | None:
    """A JSON event from `train --log-format json`, or any other output line as {"event": "log"}; None for blank."""
    line = line.rstrip("\n").rsplit("\r", 1)[-1].strip()  # a progress bar redraws with \r: keep its last state
    if not line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if isinstance(event, dict) and "event" in event:
        return event
    return {"event": "log", "message": line}


def record(job: Job, event: dict) -> None:
    """Progress goes to the latest-per-bar state (it arrives many times a second); the rest is appended.

    Only the newest LOG_LINES plain lines are kept: older ones become {"event": "dropped"}, so the
    page's `since` offsets stay valid.
    """
    if event.get("event") == "progress":
        job.progress[str(event.get("bar"))] = event
        return
    if event.get("event") == "log":
        job.log_lines.append(len(job.events))
        if len(job.log_lines) > LOG_LINES:
            job.events[job.log_lines.pop(0)] = {"event": "dropped"}
    job.events.append(event)


class TrainQueue:
    """Trainings in order, one at a time: a worker thread starts each job's subprocess when the machine is free."""

    def __init__(self, lock_path: Path = DEFAULT_LOCK, env: dict | None = None):
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock_path, self.env = lock_path, env
        self.changed = threading.Condition()
        self.closing = False
        self.worker = threading.Thread(target=self._work, name="intentlora-ui-train", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> Job:
        with self.changed:
            if job.name in self.reserved_names():
                raise HTTPException(409, f"run {job.name!r} is already queued or training")
            self.jobs[job.id] = job
            self.changed.notify_all()
        return job

    def reserved_names(self) -> set[str]:
        return {j.name for j in self.jobs.values() if j.state in ("queued", "running")}

    def live_names(self) -> set[str]:
        return {j.name for j in self.jobs.values() if j.state == "running"}

    def position(self, job: Job) -> dict:
        """{"position": 1 for the next job to start, ... (None unless queued), "ahead": trainings that go first}."""
        queued = [j for j in self.jobs.values() if j.state == "queued"]
        if job not in queued:
            return {"position": None, "ahead": 0}
        running = sum(j.state == "running" for j in self.jobs.values())
        return {"position": queued.index(job) + 1, "ahead": queued.index(job) + running}

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise HTTPException(404, f"no job {job_id!r}")
        return self.jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        """A queued job leaves the queue; a running one gets SIGTERM, then SIGKILL after STOP_GRACE_S."""
        job = self.get(job_id)
        with self.changed:
            if job.state not in ("queued", "running"):
                return job
            previous, job.state = job.state, "cancelled"
            self.changed.notify_all()
        if previous == "running" and job.process is not None:
            threading.Thread(target=stop_process, args=(job.process,), daemon=True).start()
        return job

    def close(self) -> None:
        """Stop the running training (its folder stays resumable) and the worker."""
        with self.changed:
            self.closing = True
            running = [j for j in self.jobs.values() if j.state in ("queued", "running")]
            self.changed.notify_all()
        for job in running:
            self.cancel(job.id)
            if job.process is not None:
                stop_process(job.process)
        self.worker.join(timeout=STOP_GRACE_S + 5)

    def _next(self) -> Job | None:
        with self.changed:
            while not self.closing:
                job = next((j for j in self.jobs.values() if j.state == "queued"), None)
                if job is not None:
                    return job
                self.changed.wait()
        return None

    def _work(self) -> None:
        while (job := self._next()) is not None:
            waiting = lambda: record(job, {"event": "waiting", "message": "another training holds this machine; waiting for it"})  # noqa: E731
            with machine_lock(self.lock_path, lambda: job.state != "queued" or self.closing, waiting) as acquired:
                if acquired and job.state == "queued":
                    self._run(job)

    def _run(self, job: Job) -> None:
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        with self.changed:
            if job.state != "queued":
                return
            try:
                job.process = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               text=True, encoding="utf-8", errors="replace", env=env, start_new_session=True)
            except OSError as error:
                record(job, {"event": "error", "message": f"cannot start {job.argv[0]}: {error}"})
                job.state = "failed"
                return
            job.state = "running"
        for line in job.process.stdout:
            if (event := parse_line(line)) is not None:
                record(job, event)
        job.returncode = job.process.wait()
        with self.changed:
            if job.state == "running":
                job.state = "finished" if job.returncode == 0 else "failed"
            self.changed.notify_all()


@contextlib.contextmanager
def machine_lock(path: Path, give_up: Callable[[], bool], on_wait: Callable[[], None], poll_s: float = 0.5):
    """Hold an exclusive lock on `path` (one training per machine, across UI processes); yields False if `give_up` first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    on_wait()
                    waited = True
                if give_up():
                    yield False
                    return
                time.sleep(poll_s)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM to the training's process group, SIGKILL if it is still there after STOP_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait_s)


def new_job(runs_dir: Path, req: TrainRequest, reserved: set[str]) -> Job:
    """Check the request and its data like `train` would, before it waits in the queue."""
    check_request(req)
    name = safe_name(req.name) if req.name else datetime.now().strftime("%Y%m%d-%H%M%S")
    if name in reserved:
        raise HTTPException(409, f"run {name!r} is already queued or training")
    if (runs_dir / name).exists():
        raise HTTPException(409, f"{runs_dir / name} exists: choose another run name (to continue an unfinished run, use `intentlora train --resume`)")
    checked = check_files(req.train, req.test, req.valid, req.labels)
    if checked["errors"]:
        raise HTTPException(422, {"message": f"the data has {checked['errors']} error(s)", **checked})
    run_dir = (runs_dir / name).resolve()
    return Job(uuid.uuid4().hex[:12], name, run_dir, train_argv(req, run_dir))


def resume_job(runs_dir: Path, name: str, live: set[str], reserved: set[str]) -> Job:
    run_dir = run_folder(runs_dir, name).resolve()
    if name in reserved or run_state(run_dir, live) != "unfinished":
        raise HTTPException(409, f"run {name!r} is {'queued' if name in reserved else run_state(run_dir, live)}: only an unfinished run can be resumed")
    return Job(uuid.uuid4().hex[:12], name, run_dir, resume_argv(run_dir))


# ---------------------------------------------------------------- trying a run


class ModelCache:
    """Loaded classifiers and test-set scores per run (the newest `size` runs), reloaded when a run is retrained."""

    def __init__(self, size: int = 2):
        self.size = size
        self.models: OrderedDict[tuple, object] = OrderedDict()
        self.curves: dict[tuple, dict] = {}
        self.lock = threading.Lock()

    def classifier(self, run_dir: Path):
        from intentlora.predict import IntentClassifier

        key = (str(run_dir), (run_dir / "metrics.json").stat().st_mtime)
        with self.lock:
            if key not in self.models:
                self.models[key] = IntentClassifier.from_pretrained(run_dir)
                while len(self.models) > self.size:
                    self.models.popitem(last=False)
            self.models.move_to_end(key)
            return self.models[key]

    def curve(self, run_dir: Path) -> dict:
        key = (str(run_dir), (run_dir / "metrics.json").stat().st_mtime)
        if key not in self.curves:
            self.curves[key] = test_curve(run_dir, self.classifier(run_dir))
        return self.curves[key]


def finished_run(runs_dir: Path, name: str) -> Path:
    folder = run_folder(runs_dir, name)
    if not (folder / "metrics.json").is_file():
        raise HTTPException(409, f"run {name!r} is not finished (no metrics.json): train it to the end first")
    return folder


def test_examples(run_dir: Path, labels: list[str]):
    """The run's test set as `train` scored it: its file, label set and sample limit."""
    from intentlora.data import load_file, subsample
    from intentlora.rundir import read_config as run_config

    cfg = run_config(run_dir)
    loaded = load_file(cfg.data.test, labels, drop_unknown=True, text_field=cfg.data.text_field, label_field=cfg.data.label_field)
    if loaded.errors:
        raise HTTPException(409, f"the run's test set cannot be read: {loaded.errors[0]}")
    return subsample(loaded.examples, cfg.data.max_test_samples, cfg.train.seed), cfg.data.test


def test_curve(run_dir: Path, classifier) -> dict:
    """Precision and coverage of every threshold on the run's test set, plus each text's (score, correct)."""
    from intentlora.predict import precision_curve

    examples, source = test_examples(run_dir, classifier.labels())
    predictions = classifier.predict([ex.text for ex in examples])
    scores = [p.score for p in predictions]
    correct = [p.top_k[0]["label"] == ex.label for p, ex in zip(predictions, examples)]
    return {"test_file": source, "n": len(scores), "cuts": precision_curve(scores, correct),
            "points": sorted(([s, c] for s, c in zip(scores, correct)), reverse=True)}


class TryRequest(BaseModel):
    run: str
    texts: list[str] = Field(min_length=1, max_length=64)
    top_k: int = Field(3, ge=1)
    threshold: float | None = Field(None, ge=0, le=1, description="Below it the fallback label is given (default: the run's calibration.json).")
    fallback_label: str | None = None


def try_run(runs_dir: Path, cache: ModelCache, req: TryRequest) -> dict:
    """Top-k intents per text with the fallback rule of `predict`: a score under the threshold gives the fallback label."""
    from intentlora.predict import DEFAULT_FALLBACK, fallback_rule
    from intentlora.rundir import read_calibration

    run_dir = finished_run(runs_dir, req.run)
    texts = [t for t in (t.strip() for t in req.texts) if t]
    if not texts:
        raise HTTPException(422, "type at least one text")
    classifier = cache.classifier(run_dir)
    labels = classifier.labels()
    calibration = read_calibration(run_dir)
    label = req.fallback_label or calibration.get("fallback_label") or DEFAULT_FALLBACK
    try:
        threshold, fallback = fallback_rule(labels, calibration, req.threshold, label, str(run_dir))
    except ValueError as error:
        raise HTTPException(422, str(error)) from None
    predictions = classifier.predict(texts, top_k=min(req.top_k, len(labels)))
    rows = []
    for text, p in zip(texts, predictions):
        below = threshold is not None and p.score < threshold
        rows.append({"text": text, "label": fallback if below else p.label, "score": p.score, "top_k": p.top_k, "fallback": below})
    return {"run": req.run, "labels": labels, "threshold": threshold, "fallback_label": fallback or label,
            "calibrated_threshold": calibration.get("threshold"), "predictions": rows}


# ---------------------------------------------------------------- the app


class UploadRequest(BaseModel):
    filename: str
    content_base64: str = Field(description="The file's bytes, as they are: `validate` reports bytes that are not UTF-8 at their line.")


class ValidateRequest(BaseModel):
    train: str
    test: str | None = None
    valid: str | None = None
    labels: list[str] | None = None


class CompareRequest(BaseModel):
    runs: list[str]


def build_app(runs_dir: str | Path, *, api_key: str | None = None, lock_path: Path = DEFAULT_LOCK,
              train_command: Callable[[list[str], Path], list[str]] | None = None, env: dict | None = None) -> FastAPI:
    """The UI: the page at /, its JSON API under /api (behind the key, if one is given).

    `train_command(argv, run_dir)` replaces the `train` command line `argv` (tests use a fake trainer).
    """
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    cache = ModelCache()
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["queue"] = TrainQueue(lock_path, env)
        yield
        state["queue"].close()

    app = FastAPI(title="intentlora ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGate, max_bytes=MAX_UPLOAD_BYTES)  # 413 over it, 415 for a body not JSON
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    api = [Depends(api_key_checker(api_key))]

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:  # the page holds no data: everything comes from /api, behind the key
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/api/info", dependencies=api)
    def info() -> dict:
        return {"runs_dir": str(runs_dir.resolve()), "files": known_files(runs_dir), "baselines": list(BASELINES),
                "precisions": list(PRECISIONS),
                "defaults": {k: f.default for k, f in TrainRequest.model_fields.items() if not f.is_required()}}

    @app.post("/api/upload", dependencies=api)
    def upload(body: UploadRequest) -> dict:
        path = save_upload(runs_dir / UI_DIR / "uploads", body.filename, body.content_base64)
        return {"path": str(path), **check_files(str(path), None)}

    @app.post("/api/validate", dependencies=api)
    def validate(body: ValidateRequest) -> dict:
        return check_files(body.train, body.test, body.valid, body.labels)

    @app.post("/api/jobs", dependencies=api)
    def start(body: TrainRequest) -> dict:
        queue: TrainQueue = state["queue"]
        return submit(new_job(runs_dir, body, queue.reserved_names()))

    def submit(job: Job) -> dict:
        queue: TrainQueue = state["queue"]
        if train_command is not None:
            job.argv = train_command(job.argv, job.run_dir)
        queue.submit(job)
        return {**job.summary(), **queue.position(job)}

    @app.post("/api/runs/{name}/resume", dependencies=api)
    def resume(name: str) -> dict:
        queue: TrainQueue = state["queue"]
        return submit(resume_job(runs_dir, name, queue.live_names(), queue.reserved_names()))

    @app.get("/api/jobs", dependencies=api)
    def jobs() -> list[dict]:
        queue: TrainQueue = state["queue"]
        return [{**j.summary(), **queue.position(j)} for j in reversed(queue.jobs.values())]

    @app.get("/api/jobs/{job_id}", dependencies=api)
    def job(job_id: str, since: int = 0) -> dict:
        queue: TrainQueue = state["queue"]
        j = queue.get(job_id)
        return {**j.summary(), **queue.position(j), "events": j.events[since:]}

    @app.post("/api/jobs/{job_id}/cancel", dependencies=api)
    def cancel(job_id: str) -> dict:
        return state["queue"].cancel(job_id).summary()

    @app.get("/api/runs", dependencies=api)
    def runs() -> list[dict]:
        return list_runs(runs_dir, state["queue"].live_names())

    @app.post("/api/compare", dependencies=api)
    def compare(body: CompareRequest) -> dict:
        return compare_runs(runs_dir, body.runs)

    @app.get("/api/runs/{name}/files/{filename}", dependencies=api)
    def run_file(name: str, filename: str) -> FileResponse:
        if filename not in RUN_FILES:
            raise HTTPException(404, f"{filename!r} is not a run file the UI shows ({', '.join(RUN_FILES)})")
        path = run_folder(runs_dir, name) / filename
        if not path.is_file():
            raise HTTPException(404, f"run {name!r} has no {filename} (yet)")
        return FileResponse(path)

    @app.get("/api/runs/{name}/curve", dependencies=api)
    def curve(name: str) -> dict:
        return cache.curve(finished_run(runs_dir, name))

    @app.post("/api/try", dependencies=api)
    def try_(body: TryRequest) -> dict:
        return try_run(runs_dir, cache, body)

    return app


def run(runs_dir: str | Path, *, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None) -> None:
    """Serve the UI until interrupted (Ctrl-C stops a running training too; its folder stays resumable)."""
    import uvicorn

    uvicorn.run(build_app(runs_dir, api_key=api_key), host=host, port=port, access_log=False)  # the page polls every second
