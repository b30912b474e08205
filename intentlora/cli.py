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

from intentlora.config import Config

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
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True)  # texts and labels are not markup
    raise typer.Exit(code)


def _fail_data(e, expected_name: str, found: dict | None = None) -> None:
    """A DataError for people: the label sets, rows per unknown label, the first lines (data.summarize)."""
    from intentlora.data import summarize

    _fail(f"{len(e.problems):,} problem(s) in the data:\n{summarize(e.problems, expected_name, found or e.found)}")


def _found_labels(data) -> dict:
    """{FILE: rows per label} of a file read without a label set: its own labels, for the error summary."""
    from intentlora.data import label_counts, load_file

    result = load_file(data)
    return {result.source: label_counts(result)}


# Loading a pickle (.bin) runs whatever code the file holds: safetensors only, unless asked.
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Load pickle (.bin) weights when a model has no safetensors; pickle can run code.")]


# fp32 by default: what `calibrate` measured is what `predict` and `serve` get.
# bf16 about doubles CPU throughput where the CPU's bf16 units pay (docs/BENCHMARKS.md).
Precision = Annotated[str, typer.Option(help="auto | bf16 | fp32 (auto: bf16 where the hardware computes it natively and faster than fp32).")]


def _labels(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


DEFAULTS = Config()  # what a flag left out means (configs/quickstart.yaml spells it out)
DATA, MODEL, LORA, TRAINING, OUTPUT = "Data", "Model", "LoRA", "Training", "Output"
RECIPE = "Few-example recipe (docs/QUALITY.md)"


def _flag(help: str, panel: str, default=None, *names: str, switch: bool = False):
    """A train option: its help line, its group in --help, and the config default it overrides.

    The flags default to None ("not given": the config decides), so the default
    shown is the config's; a switch (a flag without a value) shows no type."""
    shown = f" \\[default: {default}]" if default is not None else ""  # escaped: rich would read [..] as markup
    return typer.Option(*names, help=help + shown, rich_help_panel=panel, show_default=False, **({"metavar": ""} if switch else {}))


@app.command()
def train(
    config: Annotated[Optional[Path], _flag("YAML config; the flags below override it.", OUTPUT, None, "--config", "-c")] = None,
    train_file: Annotated[Optional[str], _flag("Training file (.jsonl or .csv).", DATA, "bundled bank_zh train", "--train")] = None,
    test_file: Annotated[Optional[str], _flag("Test file.", DATA, "bundled bank_zh test", "--test")] = None,
    valid_file: Annotated[Optional[str], _flag("Validation file for early stopping (else a share of train is held out).", DATA, None, "--valid")] = None,
    labels: Annotated[Optional[str], _flag("Comma-separated label set.", DATA, "the labels found in train")] = None,
    text_field: Annotated[Optional[str], _flag("Field (column) holding the text.", DATA, DEFAULTS.data.text_field)] = None,
    label_field: Annotated[Optional[str], _flag("Field (column) holding the label.", DATA, DEFAULTS.data.label_field)] = None,
    max_train_samples: Annotated[Optional[int], _flag("Use a seeded random subset of this many training texts.", DATA, "all")] = None,
    max_test_samples: Annotated[Optional[int], _flag("Use a seeded random subset of this many test texts.", DATA, "all")] = None,
    max_length: Annotated[Optional[int], _flag("Truncate texts to this many tokens.", DATA, DEFAULTS.data.max_length)] = None,
    drop_unknown: Annotated[bool, _flag("Drop (and report) rows with labels outside --labels.", DATA, None, "--drop-unknown", switch=True)] = False,
    model: Annotated[Optional[str], _flag("Hub id, folder, .gguf, pypi:NAME or modelscope:ID.", MODEL, DEFAULTS.model.name)] = None,
    trust_remote_code: Annotated[bool, _flag("Run code shipped with the model.", MODEL, "off", "--trust-remote-code", switch=True)] = False,
    allow_pickle: Annotated[bool, _flag("Load pickle (.bin) weights when a model has no safetensors; pickle can run code.", MODEL, "off", "--allow-pickle", switch=True)] = False,
    load_in_4bit: Annotated[bool, _flag("QLoRA: 4-bit NF4 base (CUDA and pip install bitsandbytes).", MODEL, "off", "--load-in-4bit", switch=True)] = False,
    lora_r: Annotated[Optional[int], _flag("LoRA rank.", LORA, DEFAULTS.lora.r, "--lora-r")] = None,
    lora_alpha: Annotated[Optional[int], _flag("LoRA alpha (scale = alpha / r).", LORA, DEFAULTS.lora.alpha, "--lora-alpha")] = None,
    lora_targets: Annotated[Optional[str], _flag("Comma-separated module names, or all-linear.", LORA, ",".join(DEFAULTS.lora.target_modules or []), "--lora-targets")] = None,
    lora_top_layers: Annotated[Optional[int], _flag("Adapt only the last N layers (faster: no backward pass below them).", LORA, "all", "--lora-top-layers")] = None,
    epochs: Annotated[Optional[float], _flag("Passes over the training data.", TRAINING, DEFAULTS.train.epochs)] = None,
    lr: Annotated[Optional[float], _flag("Peak learning rate.", TRAINING, DEFAULTS.train.lr)] = None,
    batch_size: Annotated[Optional[int], _flag("Texts per step and process.", TRAINING, DEFAULTS.train.batch_size)] = None,
    grad_accum: Annotated[Optional[int], _flag("Gradient accumulation steps.", TRAINING, DEFAULTS.train.grad_accum)] = None,
    precision: Annotated[Optional[str], _flag("auto | bf16 | fp32 | bf16-weights (the base read in bf16, computed in fp32). "
                                                       "auto: bf16 where it is faster than fp32 (timed once per machine), else bf16-weights on a CPU, fp32 on a GPU.", TRAINING, DEFAULTS.train.precision)] = None,
    device: Annotated[Optional[str], _flag("auto | cpu | cuda | cuda:N: where every model of the run goes.", TRAINING, DEFAULTS.train.device)] = None,
    seed: Annotated[Optional[int], _flag("Random seed (data split, initialisation, order).", TRAINING, DEFAULTS.train.seed)] = None,
    save_steps: Annotated[Optional[int], _flag("Checkpoint (and evaluate) every N steps.", TRAINING, "every epoch")] = None,
    gradient_checkpointing: Annotated[bool, _flag("Less activation memory, ~30% slower steps.", TRAINING, "off", "--gradient-checkpointing", switch=True)] = False,
    report_to: Annotated[Optional[str], _flag("Experiment tracking: none, tensorboard, mlflow, trackio, wandb (comma list).", TRAINING, "none", "--report-to")] = None,
    min_steps: Annotated[Optional[int], _flag("At least this many optimizer steps, however few epochs that is.", RECIPE, DEFAULTS.train.min_steps, "--min-steps")] = None,
    max_steps: Annotated[Optional[int], _flag("At most this many optimizer steps.", RECIPE, "no cap", "--max-steps")] = None,
    early_stopping_patience: Annotated[Optional[int], _flag("Stop after N evaluations without a better validation macro-F1 (0: never).", RECIPE, DEFAULTS.train.early_stopping_patience, "--early-stopping-patience")] = None,
    select_best: Annotated[Optional[bool], _flag("Keep the checkpoint with the best validation macro-F1 instead of the last step's.", RECIPE, "off", "--select-best/--no-select-best")] = None,
    head_lr: Annotated[Optional[float], _flag("Learning rate of the new head.", RECIPE, "--lr", "--head-lr")] = None,
    loraplus_lr_ratio: Annotated[Optional[float], _flag("LoRA+: the B matrices learn at lr x this.", RECIPE, "off", "--loraplus-lr-ratio")] = None,
    head_init: Annotated[Optional[str], _flag("random | zero | label_words: how the new head starts.", RECIPE, DEFAULTS.lora.head_init, "--head-init")] = None,
    prompt_template: Annotated[Optional[str], _flag("Prompt around each text, with {text} (saved with the model); none: the bare text.", RECIPE, repr(DEFAULTS.data.prompt_template), "--prompt-template")] = None,
    linear_probe_steps: Annotated[Optional[int], _flag("Train the head alone for the first N steps (LP-FT).", RECIPE, DEFAULTS.train.linear_probe_steps, "--linear-probe-steps")] = None,
    class_weights: Annotated[Optional[str], _flag("none | balanced: weight the loss against label imbalance.", RECIPE, DEFAULTS.train.class_weights, "--class-weights")] = None,
    label_smoothing: Annotated[Optional[float], _flag("Share of each target spread over the other labels (regularises a loss that reaches 0).", RECIPE, DEFAULTS.train.label_smoothing, "--label-smoothing")] = None,
    resume: Annotated[bool, _flag("Continue the unfinished run in --output from its last complete checkpoint.", OUTPUT, None, "--resume", switch=True)] = False,
    output: Annotated[Optional[str], _flag("Run directory.", OUTPUT, "runs/<timestamp>", "--output", "-o")] = None,
    keep_checkpoints: Annotated[bool, _flag("Keep checkpoints/ after a successful run (resume needs them only while unfinished).", OUTPUT, "off", "--keep-checkpoints", switch=True)] = False,
    quiet: Annotated[bool, _flag("Print warnings, errors and the final table only.", OUTPUT, "off", "--quiet", "-q", switch=True)] = False,
    log_format: Annotated[str, _flag("text, or json: one JSON object a line (CI logs, the web UI).", OUTPUT, "text", "--log-format")] = "text",
    set_: Annotated[Optional[list[str]], _flag("Any config value: section.key=value (repeatable); see intentlora/config.py.", OUTPUT, None, "--set")] = None,
) -> None:
    """Train a LoRA intent classifier; with no arguments, the quickstart on bundled data."""
    from intentlora.config import ConfigError, load_config, parse_assignment

    if log_format not in ("text", "json"):
        _fail(f"--log-format must be text or json, got {log_format!r}", EXIT_USAGE)
    on = lambda flag: True if flag else None  # noqa: E731  (a switch left off keeps the config's value)
    overrides = {
        "model.name": model, "data.train": train_file, "data.test": test_file, "data.valid": valid_file,
        "data.labels": _labels(labels), "data.text_field": text_field, "data.label_field": label_field,
        "data.max_train_samples": max_train_samples, "data.max_test_samples": max_test_samples,
        "data.max_length": max_length, "data.drop_unknown": on(drop_unknown),
        "model.trust_remote_code": on(trust_remote_code), "model.allow_pickle": on(allow_pickle),
        "model.load_in_4bit": on(load_in_4bit),
        "lora.r": lora_r, "lora.alpha": lora_alpha, "lora.target_modules": _labels(lora_targets),
        "lora.top_layers": lora_top_layers,
        "train.epochs": epochs, "train.lr": lr, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
        "train.precision": precision, "train.device": device, "train.seed": seed, "train.save_steps": save_steps,
        "train.gradient_checkpointing": on(gradient_checkpointing), "train.report_to": _labels(report_to),
        "output.dir": output, "output.keep_checkpoints": on(keep_checkpoints),
        "train.min_steps": min_steps, "train.max_steps": max_steps, "train.head_lr": head_lr,
        "train.early_stopping_patience": None if early_stopping_patience is None else (early_stopping_patience or "none"),
        "train.select_best": select_best, "train.loraplus_lr_ratio": loraplus_lr_ratio, "lora.head_init": head_init,
        "data.prompt_template": prompt_template.replace("\\n", "\n") if prompt_template else None,
        "train.linear_probe_steps": linear_probe_steps, "train.class_weights": class_weights,
        "train.label_smoothing": label_smoothing,
    }
    try:
        cfg = load_config(config, overrides, [parse_assignment(assignment) for assignment in set_ or []])
    except (ConfigError, OSError) as e:
        _fail(str(e))
    if resume and not cfg.output.dir:
        _fail("--resume needs --output DIR: the run to continue", EXIT_USAGE)
    if cfg.model.trust_remote_code:
        err.print("[yellow]warning:[/yellow] trust_remote_code is on: code from the model repository will run")
    if cfg.model.allow_pickle:
        err.print("[yellow]warning:[/yellow] allow_pickle is on: pickle weights, if the model has no safetensors, can run code when loaded")
    _quiet_libraries()
    from intentlora.console import Reporter
    from intentlora.data import DataError
    from intentlora.offline import OfflineModelError
    from intentlora.rundir import ResumeError, is_main_process
    from intentlora.train import ParityError, train as run_training

    reporter = Reporter(write=lambda line: console.print(line, highlight=False, markup=False), fmt=log_format, quiet=quiet)
    try:
        result = run_training(cfg, echo=reporter, resume=resume)
    except ResumeError as e:
        _fail(f"{e} (--resume continues an unfinished run; --output names another folder)")
    except DataError as e:
        _fail_data(e, "--labels" if cfg.data.labels else "the training file's labels")
    except ParityError as e:
        _fail(str(e), EXIT_PARITY)
    except (OfflineModelError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if not is_main_process():
        leave_without_teardown()
    if log_format == "json":  # the result event said it all
        return
    print_comparison(result.metrics)
    console.print(f"run saved to [bold]{result.run_dir}[/bold] (report.md, metrics.json, adapter/)")


def leave_without_teardown() -> None:
    """A rank other than 0 is done once training ends (rank 0 saves, checks and reports). Leaving through
    interpreter shutdown destroys its Gloo process group from there, which can abort ("terminate called
    without an active exception", pytorch/pytorch#190489) and make torchrun stop rank 0 mid-run; destroying
    the group earlier deadlocked against DDP's reducer. Exit at once: the OS closes the sockets."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    all_lines: Annotated[bool, typer.Option("--all", help="Print every problem line, not the first 20 (for scripts).")] = False,
) -> None:
    """Check data files: the label sets and rows per unknown label, then FILE:LINE: message per problem; exit 1 on any error."""
    from intentlora.data import SHOWN_LINES, label_counts, load_file, overlap_warnings, summarize

    results = [load_file(f, _labels(labels), text_field=text_field, label_field=label_field) for f in files]
    problems = [p for r in results for p in r.problems]
    for later in results[1:]:  # the first file plays train: later files must not repeat it
        problems += overlap_warnings(results[0].examples, later.examples)
    if problems:
        found = {r.source: label_counts(r) for r in results}
        print(summarize(problems, "--labels", found, None if all_lines else SHOWN_LINES, more=" (--all prints them)"))
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
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 16,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the metrics as JSON here.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda if available).")] = None,
    precision: Precision = "fp32",
    allow_pickle: AllowPickle = False,
) -> None:
    """Evaluate a saved run, a merged model or a base model (zero-shot) on any labelled file.

    A run or export is read with its own truncation and padding, in the same
    precision `predict` uses by default, so the score matches the run's metrics.json."""
    _quiet_libraries()
    from intentlora.data import DataError
    from intentlora.predict import evaluate_file

    try:
        kind, metrics, _, _ = evaluate_file(
            str(data), model, str(adapter) if adapter else None, _labels(labels), batch_size=batch_size,
            precision=precision, device=device, allow_pickle=allow_pickle,
        )
    except DataError as e:
        _fail_data(e, "--labels" if labels else "the model's labels", _found_labels(data))
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
    format: Annotated[str, typer.Option("--format", help="torch: a transformers folder; onnx: an ONNX Runtime folder for CPUs (pip install 'intentlora[onnx]').")] = "torch",
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="With --format onnx: int8 (dynamic int8 weights, about 2x faster on CPUs).")] = None,
) -> None:
    """Merge the adapter into its base: a plain transformers model folder (labels and calibration included)."""
    if format not in ("torch", "onnx"):
        _fail(f"--format must be torch or onnx, got {format!r}", EXIT_USAGE)
    if quantize is not None and (format != "onnx" or quantize != "int8"):
        _fail("--quantize takes int8, with --format onnx", EXIT_USAGE)
    _quiet_libraries()
    from intentlora.models import merge_run
    from intentlora.onnx_export import export_onnx

    try:
        path = export_onnx(run_dir, out_dir, quantize, allow_pickle) if format == "onnx" else merge_run(run_dir, out_dir, allow_pickle)
    except ImportError as e:
        _fail(str(e))
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
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 16,
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
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 16,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda if available).")] = None,
    precision: Precision = "fp32",
    allow_pickle: AllowPickle = False,
) -> None:
    """Pick the out-of-scope threshold on labelled data; store it as MODEL_PATH/calibration.json."""
    _quiet_libraries()
    from intentlora.data import DataError
    from intentlora.predict import IntentClassifier, calibrate as pick_threshold
    from intentlora.rundir import write_calibration

    try:
        classifier = IntentClassifier.from_pretrained(
            model_path, batch_size=batch_size, device=device, dtype=precision, allow_pickle=allow_pickle
        )
        result = pick_threshold(classifier, data, target_precision, fallback_label)
        path = write_calibration(model_path, result)
    except DataError as e:
        _fail_data(e, "the model's labels and the fallback label", _found_labels(data))
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
    max_batch_size: Annotated[int, typer.Option(min=1, help="Texts per micro-batch: waiting requests are combined up to this, then run sorted by length.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass within a micro-batch.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a micro-batch waits for more requests when few are queued.")] = 2,
    max_queue: Annotated[int, typer.Option(min=1, help="Texts waiting at most; past it requests get 503 with Retry-After.")] = 256,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds a request may wait for its answer; then 503 with Retry-After.")] = 30,
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
            model, adapters=adapters, batch_size=batch_size, device=device, threshold=threshold,
            fallback_label=fallback_label, dtype=precision, allow_pickle=allow_pickle,
        )
    except (OSError, ValueError) as e:
        _fail(str(e))
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/yellow] serving on {host} without --api-key: anyone who reaches it can use it")
    console.print(f"serving {', '.join(classifier.models)} on http://{host}:{port} (API docs: /docs)", highlight=False)
    run(classifier, host=host, port=port, api_key=api_key, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
        max_queue=max_queue, timeout_s=timeout, max_texts=max_texts, max_chars=max_chars)


@app.command()
def ui(
    runs: Annotated[Path, typer.Option("--runs", help="Folder of run directories: listed, compared, and where new runs go.")] = Path("runs"),
    host: Annotated[str, typer.Option(help="Address to bind; anything but 127.0.0.1 / localhost / ::1 needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 7860,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="INTENTLORA_API_KEY", help="Require this key on /api/* (the page asks for it once).")] = None,
) -> None:
    """Web UI: train runs (queued, one at a time), compare them, try them in the browser."""
    from intentlora.ui import LOOPBACK, run

    if api_key is None and host not in LOOPBACK:  # the UI starts trainings and reads server files: never open to all
        _fail(f"--host {host} opens the UI to the network: give --api-key KEY (or INTENTLORA_API_KEY)", EXIT_USAGE)
    console.print(f"intentlora ui on http://{host}:{port} (runs in {runs.resolve()})", highlight=False)
    run(runs, host=host, port=port, api_key=api_key)


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="A run directory (its adapter) or, with --merged, a folder written by `export`.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub repository: NAME or OWNER/NAME (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    merged: Annotated[bool, typer.Option("--merged", help="Push a merged model written by `export` (the whole model).")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to push to (created if missing; default main).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and print the model card; upload nothing.")] = False,
) -> None:
    """Upload a run's adapter (or an export, --merged) to the Hugging Face Hub, with its model card, labels and calibration."""
    from intentlora.hub import HubError, describe, plan, push as upload
    from intentlora.rundir import IncompleteRunError

    try:
        if dry_run:
            files, card = plan(folder, merged, repo_id)
            console.print("\n".join(describe(files)), highlight=False, markup=False)
            console.print(f"--- README.md (model card) ---\n{card}", highlight=False, markup=False)
            return
        url = upload(folder, repo_id, merged=merged, private=private, revision=revision)
    except (HubError, IncompleteRunError) as e:
        _fail(str(e))
    except OSError as e:  # network and Hub errors (huggingface_hub's HfHubHTTPError is one)
        _fail(f"upload to {repo_id} failed: {e}")
    console.print(f"pushed {folder} to {url}", highlight=False)


if __name__ == "__main__":
    app()
