"""Predictions from a trained run or a merged model: the public Python API.

`IntentClassifier` loads a run directory (base + adapter) or a folder written
by `export`: one base model in memory, any number of adapters routed by name,
an optional out-of-scope threshold. It is also what `train` scores its own
run with, so the reported score is what users get. `calibrate` picks the
threshold on labelled data; `predict_file` streams JSON Lines of any size;
`evaluate_file` scores a model (or a base model, zero-shot) on a labelled file.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from intentlora.config import DataConfig
from intentlora.data import BOM, DataError, Example, Problem, check_fields, decode_line, load_file, parse_json
from intentlora.evaluate import metrics_from_probs
from intentlora.files import atomic_file
from intentlora.inference import DEFAULT_BATCH_SIZE, DEFAULT_PRECISION, batched_logits, precision_dtype, resolve_device
from intentlora.models import add_adapter, load_merged_classifier, load_run
from intentlora.onnx_export import OnnxModel, is_onnx_folder, load_onnx
from intentlora.rundir import (
    IncompleteRunError,  # noqa: F401  (part of this API: from_pretrained raises it)
    check_run_dir,
    inference_settings,
    is_run_dir,
    read_calibration,
    read_config,
    read_inference_settings,
    read_labels,
    write_calibration,  # noqa: F401  (part of this API: store what `calibrate` picked)
)

DEFAULT_MODEL = "default"  # the name of the model given as `path`
DEFAULT_FALLBACK = "other"  # the fallback label when the label set has one


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
    # How texts become inputs, as the run trained (rundir.inference_settings): batched_logits' keyword arguments.
    settings: dict
    threshold: float | None = None
    fallback_label: str | None = None


class IntentClassifier:
    """Predict intents with a run directory (base + adapter) or a merged model folder.

    Several runs trained on the same base share one copy of it in memory; each
    is a name in `models`, chosen per call with `predict(model=...)`. Thread-safe.
    """

    def __init__(self, model: PreTrainedModel | OnnxModel, tokenizer, routes: dict[str, _Route], batch_size: int = DEFAULT_BATCH_SIZE,
                 precision: str = "fp32"):
        self._model = model
        self.precision = precision  # fp32, bf16, onnx-fp32 or onnx-int8: what scores are computed in (calibration.json keeps it)
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
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | None = None,
        max_length: int | None = None,
        threshold: float | None = None,
        fallback_label: str | None = None,
        dtype: torch.dtype | str | None = None,
        allow_pickle: bool = False,
        base: str | None = None,
    ) -> IntentClassifier:
        """Load `path` (named "default") and `adapters` ({name: run directory}) on one base model.

        `path` is a run directory written by `train` or a folder written by
        `export` (torch, or ONNX Runtime when it holds model.onnx: CPU, its
        own precision); adapters need run directories trained on the same base.
        `max_length` defaults to each run's truncation length, `threshold` and
        `fallback_label` to each model's calibration.json (if any); `dtype`
        (torch dtype, or "auto"/"bf16"/"fp32") to the tool's default precision
        (fp32: exact, and what `train` scores its run with and `calibrate`
        uses unless told otherwise); bf16 is about 2x faster on CPUs with bf16
        units. `device` defaults to the GPU when there is one.
        Base weights in pickle format are refused unless `allow_pickle`;
        `base` replaces the runs' base model spec (e.g. a local copy of a hub model).
        """
        sources = named_sources(path, adapters)
        device = resolve_device(device)
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else precision_dtype(dtype or DEFAULT_PRECISION, device)
        if path is not None and not is_run_dir(Path(path)):
            if adapters:
                raise ValueError(f"{path}: a merged model cannot take adapters; give the run directory it was exported from")
            load = load_onnx_folder if is_onnx_folder(path) else load_merged  # the backend follows the folder
            model, tokenizer, routes = load(Path(path), torch_dtype, allow_pickle, device)
        else:
            model, tokenizer, routes = load_runs(sources, torch_dtype, allow_pickle, device, base=base)
        precision = model_precision(model)
        for name, route in routes.items():
            if max_length:
                route.settings = {**route.settings, "max_length": max_length}
            calibration = read_calibration(sources[name])
            route.threshold, route.fallback_label = fallback_rule(route.labels, calibration, threshold, fallback_label, str(sources[name]))
            if threshold is None and route.threshold is not None:
                check_calibration_precision(calibration, precision, str(sources[name]))
        return cls(model, tokenizer, routes, batch_size, precision)

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
        check_texts(texts)
        self.predictions(torch.empty(0, len(self.labels(model))), top_k, model)  # a bad top_k fails before the work
        return self.predictions(self.probabilities(texts, model), top_k, model)

    def predictions(self, probs: torch.Tensor, top_k: int = 1, model: str | None = None) -> list[Prediction]:
        """Rows of `probabilities(texts, model)` as Predictions: top_k labels, the threshold applied."""
        route = self._route(model)
        if not 1 <= top_k <= len(route.labels):
            raise ValueError(f"top_k must be between 1 and {len(route.labels)} (the number of labels), got {top_k}")
        return [to_prediction(row, route, top_k) for row in probs]

    def probabilities(self, texts: Sequence[str], model: str | None = None, progress=None) -> torch.Tensor:
        """Class probabilities, shape (texts, labels), columns in the order of `labels(model)`; no threshold.

        `progress(n)` is called after each batch of n texts."""
        route = self._route(model)
        with self._lock:
            if route.adapter is not None and route.adapter != self._active:
                self._model.set_adapter(route.adapter, inference_mode=True)
                self._active = route.adapter
            forward = self._model.logits if isinstance(self._model, OnnxModel) else partial(batched_logits, self._model)
            logits = forward(self._tokenizer, list(texts), batch_size=self.batch_size, progress=progress, **route.settings)
        return logits.softmax(-1)

    def _route(self, model: str | None) -> _Route:
        name = self.models[0] if model is None else model
        if name not in self._routes:
            raise UnknownModelError(f"unknown model {name!r}; loaded: {', '.join(self._routes)}")
        return self._routes[name]


def model_precision(model) -> str:
    """fp32 / bf16 / fp16 for torch (the base weights' dtype), onnx-fp32 / onnx-int8 for ONNX Runtime."""
    if isinstance(model, OnnxModel):
        return f"onnx-{model.quantize or 'fp32'}"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(model.parameters()).dtype, "fp32")


def check_calibration_precision(calibration: dict, precision: str, where: str) -> None:
    """A threshold is a cut through scores: used in another precision than it was picked in, it keeps other texts."""
    picked_in = calibration.get("model_precision", "fp32")  # before this field, calibrate ran in fp32 only
    if picked_in.removeprefix("onnx-") != precision.removeprefix("onnx-"):  # ONNX fp32 computes what torch fp32 does
        remedy = (f"load it in {picked_in} (--precision)" if not precision.startswith("onnx-") and not picked_in.startswith("onnx-")
                  else f"use the export made in {picked_in}")
        warnings.warn(
            f"{where}: the threshold in calibration.json was picked in {picked_in}, this model runs in {precision}; "
            f"scores differ slightly between the two, so its precision/coverage may not hold: {remedy}, "
            f"or run `intentlora calibrate` on it again",
            stacklevel=3,
        )


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


def load_merged(path: Path, dtype: torch.dtype, allow_pickle: bool = False, device: str | torch.device | None = "cpu"):
    loaded = load_merged_classifier(str(path), dtype=dtype, allow_pickle=allow_pickle, device=device)
    if loaded is None:
        raise ValueError(f"{path}: a base model, not a classifier; give a run directory or a folder written by `export`")
    model, tokenizer, labels = loaded
    settings = read_inference_settings(path) or {"max_length": tokenizer_max_length(tokenizer)}
    return model, tokenizer, {DEFAULT_MODEL: _Route(labels, None, settings)}


def load_onnx_folder(path: Path, dtype: torch.dtype, allow_pickle: bool = False, device=None):
    """A folder written by `export --format onnx`: ONNX Runtime on the CPU, in the precision it was exported in
    (fp32 or int8 weights), whatever `dtype` and `device` say."""
    model, tokenizer, labels, settings = load_onnx(path)
    return model, tokenizer, {DEFAULT_MODEL: _Route(labels, None, settings or {"max_length": tokenizer_max_length(tokenizer)})}


def tokenizer_max_length(tokenizer) -> int:
    """Folders without intentlora.json: `export` stored the truncation length here; others may hold a huge placeholder."""
    return tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else DataConfig.max_length


def load_runs(sources: dict[str, Path], dtype: torch.dtype, allow_pickle: bool = False, device: str | torch.device | None = "cpu",
              check_finished: bool = True, base: str | None = None):
    """One base model with every run's adapter, each under its name."""
    if check_finished:
        for run_dir in sources.values():
            check_run_dir(run_dir)
    configs = {name: read_config(run_dir) for name, run_dir in sources.items()}
    check_same_base(sources, configs)
    first, *others = sources
    model, tokenizer, labels = load_run(sources[first], dtype, base=base, adapter_name=first, allow_pickle=allow_pickle,
                                        device=device, check_finished=check_finished)
    routes = {first: run_route(labels, first, configs[first])}
    for name in others:
        labels = read_labels(sources[name])
        add_adapter(model, sources[name] / "adapter", name, len(labels))
        routes[name] = run_route(labels, name, configs[name])
    return model, tokenizer, routes


def run_route(labels: list[str], adapter: str, cfg) -> _Route:
    return _Route(labels, adapter, inference_settings(cfg))


def classifier_for_run(run_dir: Path, *, device: str | torch.device | None = None, allow_pickle: bool = False) -> IntentClassifier:
    """The run as `IntentClassifier.from_pretrained(run_dir)` loads it, before metrics.json exists: what `train` scores."""
    device = resolve_device(device)
    model, tokenizer, routes = load_runs({DEFAULT_MODEL: Path(run_dir)}, precision_dtype(DEFAULT_PRECISION, device), allow_pickle,
                                         device, check_finished=False)
    return IntentClassifier(model, tokenizer, routes, precision=model_precision(model))


def check_same_base(sources: dict[str, Path], configs: dict) -> None:
    bases = {name: (cfg.model.name, cfg.model.revision) for name, cfg in configs.items()}
    first = next(iter(bases))
    for name, base in bases.items():
        if base != bases[first]:
            raise ValueError(
                f"adapters must share one base model: {sources[name]} was trained on {base[0]!r}, "
                f"{sources[first]} on {bases[first][0]!r}"
            )


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
            "n": len(scores), "data": str(data), "model_precision": classifier.precision}


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
    with source.open("rb") as lines, atomic_file(target) as out, \
            tqdm(total=source.stat().st_size, unit="B", unit_scale=True, desc=source.name, leave=False) as progress:
        rows = good_rows(lines, source, text_field, strict, counts, report, progress)
        while chunk := list(islice(rows, chunk_lines)):
            for row, prediction in zip(chunk, classifier.predict([row[text_field] for row in chunk], top_k, model)):
                out.write(json.dumps({**row, "prediction": prediction.to_dict()}, ensure_ascii=False) + "\n")
            counts.predicted += len(chunk)
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


def evaluate_file(
    data: str | Path,
    model: str | None = None,
    adapter: str | Path | None = None,
    labels: list[str] | None = None,
    descriptions: dict[str, str] | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    precision: str = DEFAULT_PRECISION,
    device: str | None = None,
    allow_pickle: bool = False,
) -> tuple[str, dict, list[Example], torch.Tensor]:
    """Score a saved run (`adapter`, base replaced by `model` if given), a merged classifier, or a base model zero-shot.

    A run or export is loaded exactly as `predict` loads it (its truncation,
    padding, and the same default precision), so the score equals the one
    `train` reported for the same file. Returns (kind, metrics, examples,
    probabilities); the file is checked against the model's own label set.
    """
    from intentlora.models import load_causal_lm, load_tokenizer, resolve_model_path

    if adapter or (model and is_classifier_folder(model)):
        classifier = IntentClassifier.from_pretrained(
            adapter or model, base=model if adapter else None, batch_size=batch_size, device=device, dtype=precision,
            allow_pickle=allow_pickle,
        )
        labels = classifier.labels()
        examples = checked_examples(data, labels)
        probs = classifier.probabilities([ex.text for ex in examples])
        return ("lora" if adapter else "classifier"), metrics_from_probs(examples, probs, labels), examples, probs
    if not model:
        raise ValueError("give --model (a merged model or a base model) or --adapter RUN_DIR")
    from intentlora.zeroshot import zero_shot_scores

    path = resolve_model_path(model)
    tokenizer = load_tokenizer(path)
    if not tokenizer.chat_template:
        raise ValueError(f"{model}: not a classifier and has no chat template, so it cannot be prompted zero-shot")
    examples = checked_examples(data, labels)
    labels = labels or sorted({ex.label for ex in examples})
    lm = load_causal_lm(path, precision_dtype("auto", device), device=device)
    probs = zero_shot_scores(lm, tokenizer, [ex.text for ex in examples], labels, descriptions).softmax(-1)
    return "zero_shot", metrics_from_probs(examples, probs, labels), examples, probs


def is_classifier_folder(model: str) -> bool:
    """True for a local folder that holds a classifier (written by `export`), not a base model."""
    from transformers import AutoConfig

    folder = Path(model)
    if not (folder / "config.json").is_file():
        return False
    architectures = AutoConfig.from_pretrained(folder).architectures or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def checked_examples(data: str | Path, labels: list[str] | None) -> list[Example]:
    result = load_file(data, labels)
    if result.errors:
        raise DataError(result.errors)
    return result.examples
