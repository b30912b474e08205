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
EXIT_INPUT, EXIT_PARITY = 1, 3


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
    }
    try:
        for assignment in set_ or []:
            key, value = parse_assignment(assignment)
            overrides[key] = value
        cfg = load_config(config, overrides)
    except (ConfigError, OSError) as e:
        _fail(str(e))
    if cfg.model.trust_remote_code:
        err.print("[yellow]warning:[/yellow] trust_remote_code is on: code from the model repository will run")
    _quiet_libraries()
    from intentlora.data import DataError
    from intentlora.offline import OfflineModelError
    from intentlora.train import ParityError, train as run_training

    try:
        result = run_training(cfg, echo=lambda line: console.print(line, highlight=False, markup=False))
    except DataError as e:
        _fail(f"{len(e.problems)} problem(s) in the data:\n{e}")
    except ParityError as e:
        _fail(str(e), EXIT_PARITY)
    except (OfflineModelError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
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
    batch_size: Annotated[int, typer.Option()] = 64,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the metrics as JSON here.")] = None,
) -> None:
    """Evaluate a saved run, a merged model or a base model (zero-shot) on any labelled file."""
    _quiet_libraries()
    from intentlora.data import DataError
    from intentlora.evaluate import evaluate_file

    try:
        kind, metrics = evaluate_file(str(data), model, str(adapter) if adapter else None, _labels(labels), batch_size=batch_size)
    except DataError as e:
        _fail(f"{len(e.problems)} problem(s) in the data (the model's labels: see above):\n{e}")
    except (FileNotFoundError, OSError, ValueError) as e:
        _fail(str(e))
    print_metrics_table({kind: metrics}, f"{data}: {metrics['n']} examples")
    if output:
        output.write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `train`.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the merged model.")],
) -> None:
    """Merge the adapter into its base: a plain transformers model folder."""
    _quiet_libraries()
    from intentlora.models import merge_run

    try:
        path = merge_run(run_dir, out_dir)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"merged model written to [bold]{path}[/bold]")


if __name__ == "__main__":
    app()
