"""Predictions from a trained run or a merged model.

`batched_logits` is the one inference loop (training, evaluation and the API
share it). `IntentClassifier` is the Python API: one base model in memory,
any number of adapters routed by name, an optional out-of-scope threshold.
`calibrate` picks that threshold on labelled data; `predict_file` streams
JSON Lines of any size through a classifier.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from intentlora.config import DataConfig, load_config
from intentlora.files import write_text_atomic
from intentlora.data import BOM, DataError, Problem, check_fields, decode_line, load_file, parse_json
from intentlora.models import (
    CALIBRATION_FILE,
    IncompleteRunError,  # noqa: F401  (part of this API: from_pretrained raises it)
    add_adapter,
    check_run_dir,
    load_merged_classifier,
    load_run,
    load_run_labels,
    precision_dtype,
)

DEFAULT_MODEL = "default"  # the name of the model given as `path`
DEFAULT_FALLBACK = "other"  # the fallback label when the label set has one


def autocast_for(model: torch.nn.Module):
    """bf16 weights need autocast so fp32 LoRA/head weights meet bf16 activations."""
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=dtype)


@torch.inference_mode()
def batched_logits(
    model: PreTrainedModel,
    tokenizer,
    texts: list[str],
    batch_size: int = 16,
    max_length: int = 128,
    pad_to_max_length: bool = False,
) -> torch.Tensor:
    """fp32 logits of shape (len(texts), num_labels), in the order of `texts`.

    Texts run sorted by length, so a batch pads to its own longest text;
    `pad_to_max_length` pads all to `max_length` (only to reproduce the reference).
    """
    model.eval()
    if not texts:
        return torch.empty(0, model.config.num_labels)
    device = next(model.parameters()).device
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    out = None  # sized by the first batch: with several adapters the active head knows the label count, not model.config
    padding = {"padding": "max_length", "max_length": max_length} if pad_to_max_length else {}
    with autocast_for(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt", **padding).to(device)
            logits = model(**batch).logits.float().cpu()
            if out is None:
                out = torch.empty(len(texts), logits.shape[-1])
            out[rows] = logits
    return out


class UnknownModelError(KeyError):
    """predict(model=...) named a model the classifier did not load."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class CalibrationError(ValueError):
    """No threshold reaches the target precision on the calibration data."""


@dataclass
class Prediction:
    label: str  # the final label: the fallback label if the score is below the threshold
    score: float  # probability of the most likely label
    top_k: list[dict]  # [{"label", "score"}, ...], most likely first
    fallback: bool  # True when the threshold replaced the label

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Route:
    """What one name in `IntentClassifier.models` stands for."""

    labels: list[str]
    adapter: str | None  # PEFT adapter name; None for a merged model
    max_length: int
    threshold: float | None
    fallback_label: str | None


class IntentClassifier:
    """Predict intents with a run directory (base + adapter) or a merged model folder.

    Several runs trained on the same base share one copy of it in memory; each
    is a name in `models`, chosen per call with `predict(model=...)`. Thread-safe.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, routes: dict[str, _Route], batch_size: int = 32):
        self._model = model
        self._tokenizer = tokenizer
        self._routes = routes
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one adapter active at a time: switch and forward together
        self._active: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None,
        *,
        adapters: dict[str, str | Path] | None = None,
        batch_size: int = 32,
        device: str | None = None,
        max_length: int | None = None,
        threshold: float | None = None,
        fallback_label: str | None = None,
        dtype: torch.dtype | str | None = None,
        allow_pickle: bool = False,
    ) -> IntentClassifier:
        """Load `path` (named "default") and `adapters` ({name: run directory}) on one base model.

        `path` is a run directory written by `train` or a folder written by
        `export`; adapters need run directories trained on the same base.
        `max_length` defaults to each run's truncation length, `threshold` and
        `fallback_label` to each model's calibration.json (if any); `dtype`
        (torch dtype, or "auto"/"bf16"/"fp32") to fp32: exact, and what
        `calibrate` uses unless told otherwise; bf16 is about 2x faster on CPUs
        with bf16 units (train scores its run in its own training precision).
        Base weights in pickle format are refused unless `allow_pickle`.
        """
        sources = named_sources(path, adapters)
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else precision_dtype(dtype or "fp32")
        if path is not None and not is_run_dir(Path(path)):
            if adapters:
                raise ValueError(f"{path}: a merged model cannot take adapters; give the run directory it was exported from")
            model, tokenizer, routes = load_merged(Path(path), torch_dtype, allow_pickle)
        else:
            model, tokenizer, routes = load_runs(sources, torch_dtype, allow_pickle)
        for name, route in routes.items():
            route.max_length = max_length or route.max_length
            calibration = read_calibration(sources[name])
            route.threshold, route.fallback_label = fallback_rule(route.labels, calibration, threshold, fallback_label, str(sources[name]))
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, tokenizer, routes, batch_size)

    @property
    def models(self) -> list[str]:
        return list(self._routes)

    def labels(self, model: str | None = None) -> list[str]:
        return list(self._route(model).labels)

    def predict(self, texts: Sequence[str], top_k: int = 1, model: str | None = None) -> list[Prediction]:
        """One Prediction per text, in the order given; batches are grouped by length internally.

        Raises UnknownModelError (a KeyError) for a name not in `models`,
        ValueError for a top_k outside 1..number of labels or an empty text.
        """
        route = self._route(model)
        check_texts(texts)
        if not 1 <= top_k <= len(route.labels):
            raise ValueError(f"top_k must be between 1 and {len(route.labels)} (the number of labels), got {top_k}")
        with self._lock:
            if route.adapter is not None and route.adapter != self._active:
                self._model.set_adapter(route.adapter, inference_mode=True)
                self._active = route.adapter
            probs = batched_logits(self._model, self._tokenizer, list(texts), self.batch_size, route.max_length).softmax(-1)
        return [to_prediction(row, route, top_k) for row in probs]

    def _route(self, model: str | None) -> _Route:
        name = self.models[0] if model is None else model
        if name not in self._routes:
            raise UnknownModelError(f"unknown model {name!r}; loaded: {', '.join(self._routes)}")
        return self._routes[name]


def named_sources(path: str | Path | None, adapters: dict[str, str | Path] | None) -> dict[str, Path]:
    sources = {DEFAULT_MODEL: Path(path)} if path is not None else {}
    for name, run_dir in (adapters or {}).items():
        if name in sources:
            raise ValueError(f"adapter name {name!r} is taken by `path`; choose another name")
        sources[name] = Path(run_dir)
    if not sources:
        raise ValueError("give a model path, adapters, or both")
    for source in sources.values():
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such run directory or model folder")
    return sources


def is_run_dir(path: Path) -> bool:
    """Anything but a model folder (config.json) is taken for a run, so check_run_dir can say what is missing."""
    return not (path / "config.json").is_file()


def load_merged(path: Path, dtype: torch.dtype, allow_pickle: bool = False):
    loaded = load_merged_classifier(str(path), dtype=dtype, allow_pickle=allow_pickle)
    if loaded is None:
        raise ValueError(f"{path}: a base model, not a classifier; give a run directory or a folder written by `export`")
    model, tokenizer, labels = loaded
    return model, tokenizer, {DEFAULT_MODEL: _Route(labels, None, tokenizer_max_length(tokenizer), None, None)}


def tokenizer_max_length(tokenizer) -> int:
    """`export` stores the run's truncation length here; other folders may hold a huge placeholder."""
    return tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else DataConfig.max_length


def load_runs(sources: dict[str, Path], dtype: torch.dtype, allow_pickle: bool = False):
    """One base model with every run's adapter, each under its name."""
    for run_dir in sources.values():
        check_run_dir(run_dir)
    configs = {name: load_config(run_dir / "config.yaml") for name, run_dir in sources.items()}
    check_same_base(sources, configs)
    first, *others = sources
    model, tokenizer, labels = load_run(sources[first], dtype, adapter_name=first, allow_pickle=allow_pickle)
    routes = {first: _Route(labels, first, configs[first].data.max_length, None, None)}
    for name in others:
        labels = load_run_labels(sources[name])
        add_adapter(model, sources[name] / "adapter", name, len(labels))
        routes[name] = _Route(labels, name, configs[name].data.max_length, None, None)
    return model, tokenizer, routes


def check_same_base(sources: dict[str, Path], configs: dict) -> None:
    bases = {name: (cfg.model.name, cfg.model.revision) for name, cfg in configs.items()}
    first = next(iter(bases))
    for name, base in bases.items():
        if base != bases[first]:
            raise ValueError(
                f"adapters must share one base model: {sources[name]} was trained on {base[0]!r}, "
                f"{sources[first]} on {bases[first][0]!r}"
            )


def read_calibration(folder: Path) -> dict:
    path = folder / CALIBRATION_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg}); delete it or run `intentlora calibrate` again") from None


def fallback_rule(labels: list[str], calibration: dict, threshold: float | None, fallback_label: str | None, where: str):
    """(threshold, fallback label): the explicit arguments win over calibration.json."""
    threshold = calibration.get("threshold") if threshold is None else threshold
    if threshold is None:
        return None, None
    if not 0 <= threshold <= 1:
        raise ValueError(f"{where}: threshold must be between 0 and 1, got {threshold}")
    label = fallback_label or calibration.get("fallback_label") or default_fallback(labels)
    if label is None:
        raise ValueError(f"{where}: a threshold needs a fallback label, and the labels have no {DEFAULT_FALLBACK!r}; give one")
    return threshold, label


def default_fallback(labels: list[str]) -> str | None:
    return DEFAULT_FALLBACK if DEFAULT_FALLBACK in labels else None


def check_texts(texts: Sequence[str]) -> None:
    """Reject what the tokenizer would turn into an obscure error (or a zero-token batch)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"texts[{i}] is empty")


def to_prediction(probs: torch.Tensor, route: _Route, top_k: int) -> Prediction:
    scores, ids = probs.topk(top_k)
    top = [{"label": route.labels[i], "score": s} for s, i in zip(scores.tolist(), ids.tolist())]
    score = top[0]["score"]
    fallback = route.threshold is not None and score < route.threshold
    return Prediction(route.fallback_label if fallback else top[0]["label"], score, top, fallback)


def calibrate(
    classifier: IntentClassifier,
    data: str | Path,
    target_precision: float,
    fallback_label: str | None = None,
    model: str | None = None,
) -> dict:
    """The smallest threshold whose kept predictions reach `target_precision` on labelled `data`.

    A prediction is kept when its score (the top label's probability) is at
    least the threshold; the others get the fallback label. precision = kept
    predictions whose label equals the gold label / kept predictions;
    coverage = kept predictions / all texts. Rows labelled with the fallback
    label (it may be outside the model's labels, e.g. out-of-scope examples)
    count as errors whenever they are kept with another label. The smallest
    such threshold keeps the most predictions. Any threshold between the
    lowest kept score and the highest dropped one keeps the same texts; the
    midpoint is stored, so float noise between batchings cannot flip the
    borderline text (0 when every text is kept).
    Raises CalibrationError when no threshold reaches the target.
    """
    labels = classifier.labels(model)
    fallback_label = fallback_label or default_fallback(labels)
    if fallback_label is None:
        raise ValueError(f"the labels have no {DEFAULT_FALLBACK!r}: give the fallback label")
    loaded = load_file(data, labels + [fallback_label] if fallback_label not in labels else labels)
    if loaded.errors:
        raise DataError(loaded.errors)
    predictions = classifier.predict([ex.text for ex in loaded.examples], 1, model)
    scores = [p.score for p in predictions]
    correct = [p.top_k[0]["label"] == ex.label for p, ex in zip(predictions, loaded.examples)]
    cuts = precision_curve(scores, correct)
    reached = [cut for cut in cuts if cut["precision"] >= target_precision]
    if not reached:
        best = max(cuts, key=lambda cut: (cut["precision"], cut["coverage"]))
        raise CalibrationError(
            f"no threshold reaches precision {target_precision} on {data}: the best is {best['precision']:.4f} "
            f"(threshold {best['threshold']:.4f}, coverage {best['coverage']:.4f}); lower the target or improve the model"
        )
    chosen = min(reached, key=lambda cut: cut["threshold"])
    return {**chosen, "fallback_label": fallback_label, "target_precision": target_precision,
            "n": len(scores), "data": str(data)}


def precision_curve(scores: list[float], correct: list[bool]) -> list[dict]:
    """Threshold, precision and coverage for every way to cut the scores (equal scores stay together)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    cuts, hits = [], 0
    for kept, i in enumerate(order, start=1):
        hits += correct[i]
        if kept < len(order) and scores[order[kept]] == scores[i]:
            continue
        threshold = (scores[i] + scores[order[kept]]) / 2 if kept < len(order) else 0.0
        cuts.append({"threshold": threshold, "precision": hits / kept, "coverage": kept / len(order)})
    return cuts


def write_calibration(folder: str | Path, calibration: dict) -> Path:
    """calibration.json next to the model, where from_pretrained finds it; written atomically."""
    return write_text_atomic(Path(folder) / CALIBRATION_FILE, json.dumps(calibration, indent=2, ensure_ascii=False))


@dataclass
class FileCounts:
    predicted: int = 0
    bad: int = 0


def predict_file(
    classifier: IntentClassifier,
    source: str | Path,
    target: str | Path,
    *,
    text_field: str = "text",
    top_k: int = 1,
    model: str | None = None,
    strict: bool = False,
    chunk_lines: int = 1024,
    report: Callable[[Problem], None] = print,
) -> FileCounts:
    """Stream JSON Lines from `source` to `target`, each row plus its "prediction"; constant memory.

    A bad line (undecodable, invalid JSON, no usable text) is passed to
    `report` as FILE:LINE and skipped; with `strict` the first one raises
    DataError and nothing is written. `target` appears only when complete.
    """
    source, target = Path(source), Path(target)
    counts = FileCounts()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
    try:
        with source.open("rb") as lines, os.fdopen(fd, "w", encoding="utf-8") as out, \
                tqdm(total=source.stat().st_size, unit="B", unit_scale=True, desc=source.name, leave=False) as progress:
            rows = good_rows(lines, source, text_field, strict, counts, report, progress)
            while chunk := list(islice(rows, chunk_lines)):
                for row, prediction in zip(chunk, classifier.predict([row[text_field] for row in chunk], top_k, model)):
                    out.write(json.dumps({**row, "prediction": prediction.to_dict()}, ensure_ascii=False) + "\n")
                counts.predicted += len(chunk)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return counts


def good_rows(
    lines: Iterator[bytes], source: Path, text_field: str, strict: bool, counts: FileCounts,
    report: Callable[[Problem], None], progress: tqdm,
) -> Iterator[dict]:
    """The usable rows of a JSON Lines byte stream; the others are reported (and counted) as they pass."""
    for line_no, raw in enumerate(lines, start=1):
        progress.update(len(raw))
        where, problems = f"{source}:{line_no}", []
        line = decode_line(raw.removeprefix(BOM) if line_no == 1 else raw, where, problems)
        if line is not None and not line.strip():
            continue
        if line is not None:
            parsed, row = parse_json(line, where, problems)
            if parsed and check_fields(row, where, (text_field,), problems):
                yield row
                continue
        counts.bad += 1
        for problem in problems:
            report(problem)
        if strict:
            raise DataError(problems)
