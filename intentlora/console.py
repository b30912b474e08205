"""What a run tells the person (or the CI log, or the web UI) watching it.

One `Reporter` per run: each phase announced in one line, named progress bars,
one readable line per training log step instead of Trainer's raw dicts.
`fmt="json"` writes one JSON object a line instead (for CI logs and the web
UI); `quiet` keeps warnings and errors only.

JSON events: {"time", "event", ...} with event one of
`phase` {phase, message}, `info` {message}, `warning` {message},
`train_log` {step, max_steps, epoch, loss, learning_rate, grad_norm},
`eval` {step, epoch, split, macro_f1, accuracy, loss},
`progress` {bar, n, total}, `result` {run_dir, metrics}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

from tqdm.auto import tqdm
from transformers import TrainerCallback

PHASES = ("data", "model", "baselines", "training", "saving", "checking", "evaluating", "report", "done")


class Reporter:
    def __init__(self, write: Callable[[str], None] = print, fmt: str = "text", quiet: bool = False, bars: bool = True):
        if fmt not in ("text", "json"):
            raise ValueError(f"log format must be text or json, got {fmt!r}")
        self.write, self.fmt, self.quiet = write, fmt, quiet
        self.bars = bars and fmt == "text" and not quiet
        if fmt == "json" or quiet:
            os.environ["TQDM_DISABLE"] = "1"  # libraries' own bars (datasets, zero-shot) too

    def _event(self, event: str, text: str | None, **fields) -> None:
        if self.fmt == "json":
            record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}
            self.write(json.dumps(record, ensure_ascii=False, default=str))
        elif text is not None and (not self.quiet or event in ("warning", "error")):
            with tqdm.external_write_mode():  # above the live bars, not through them
                self.write(text)

    def __call__(self, message: str) -> None:
        """A plain line: data problems, what was loaded, where a run resumes."""
        self._event("info", message, message=message)

    def phase(self, phase: str, message: str) -> None:
        self._event("phase", f"[{phase}] {message}", phase=phase, message=message)

    def warning(self, message: str) -> None:
        self._event("warning", f"warning: {message}", message=message)

    def train_log(self, entry: dict) -> None:
        text = f"step {entry['step']}/{entry['max_steps']}  epoch {entry['epoch']:.2f}  loss {entry['loss']:.4f}  lr {entry['learning_rate']:.2e}"
        self._event("train_log", text, **entry)

    def eval(self, entry: dict) -> None:
        text = f"eval {entry['split']} at step {entry['step']} (epoch {entry['epoch']:.2f}): macro-F1 {entry['macro_f1']:.4f}  accuracy {entry['accuracy']:.4f}  loss {entry['loss']:.4f}"
        self._event("eval", text, **entry)

    def result(self, run_dir, metrics: dict) -> None:
        self._event("result", None, run_dir=str(run_dir), metrics=metrics)

    def bar(self, name: str, total: int, unit: str = "it") -> "Bar":
        return Bar(self, name, total, unit)


class Bar:
    """A named tqdm bar in text mode; `progress` events (at most about one a second) in JSON mode."""

    def __init__(self, reporter: Reporter, name: str, total: int, unit: str):
        self.reporter, self.name, self.total, self.n = reporter, name, total, 0
        self._last = 0.0
        self._tqdm = tqdm(total=total, desc=name, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr) if reporter.bars else None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self.reporter.fmt == "json" and (time.monotonic() - self._last > 1 or self.n >= self.total):
            self._last = time.monotonic()
            self.reporter._event("progress", None, bar=self.name, n=self.n, total=self.total)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ReporterCallback(TrainerCallback):
    """Trainer's progress through the Reporter: a `train` bar, `eval valid` bars, readable log lines."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.train_bar: Bar | None = None
        self.eval_bar: Bar | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_bar = self.reporter.bar("train", state.max_steps, unit="step")
        self.train_bar.update(state.global_step)  # a resumed run starts part-way

    def on_step_end(self, args, state, control, **kwargs):
        if self.train_bar is not None:
            self.train_bar.update(state.global_step - self.train_bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.eval_bar is None and eval_dataloader is not None:
            self.eval_bar = self.reporter.bar("eval valid", len(eval_dataloader), unit="batch")
        if self.eval_bar is not None:
            self.eval_bar.update()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        where = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            self.reporter.train_log({**where, "max_steps": state.max_steps, "loss": logs["loss"],
                                     "learning_rate": logs.get("learning_rate", 0.0), "grad_norm": logs.get("grad_norm")})
        if "eval_macro_f1" in logs:
            self.reporter.eval({**where, "split": "valid", "macro_f1": logs["eval_macro_f1"],
                                "accuracy": logs.get("eval_accuracy", 0.0), "loss": logs.get("eval_loss", 0.0)})

    def on_train_end(self, args, state, control, **kwargs):
        if self.train_bar is not None:
            self.train_bar.close()


def as_reporter(echo=None) -> Reporter:
    """`train(cfg, echo=...)` takes a Reporter, or any function of one line (tests, scripts): lines only, no bars.
    None: silent."""
    if isinstance(echo, Reporter):
        return echo
    return Reporter(write=echo or (lambda _: None), bars=False)
