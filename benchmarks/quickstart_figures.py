"""The README's quickstart figures, measured: run the quickstart and print them as Markdown.

Runs `intentlora train` with no arguments (the README's quickstart) in a
temporary folder under `/usr/bin/time -v`, for its wall time and peak RSS, and
first converts the offline model into an empty cache, for the one-time
conversion cost a new user pays. Prints the machine, those figures, the
before/after macro-F1 table from the run's metrics.json and the report's
verdict, ready to paste into the README:

    flock /tmp/intentlora-heavy.lock .venv/bin/python benchmarks/quickstart_figures.py
    .venv/bin/python benchmarks/quickstart_figures.py --smoke      # tiny random model, seconds (CI)

`--skip-conversion` leaves out the cold-cache conversion (about a minute and
2.4 GB of temporary disk for the 0.5B).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
TIME = "/usr/bin/time"  # GNU time: `-v` reports the maximum resident set size of the process tree's largest process


def timed(command: list[str], cwd: Path, env: dict | None = None, quiet: bool = False) -> dict:
    """Run `command` under `/usr/bin/time -v`: {wall_s, peak_rss_mb}; raise with the output's tail on failure."""
    report = cwd / "time.txt"
    start = time.perf_counter()
    result = subprocess.run([TIME, "-v", "-o", str(report), *command], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        tail = (result.stdout or "")[-3000:]
        raise SystemExit(f"{' '.join(command)} failed with exit code {result.returncode}\n{tail}")
    text = report.read_text()
    cpu = float(field(text, "User time (seconds)")) + float(field(text, "System time (seconds)"))
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(int(field(text, "Maximum resident set size (kbytes)")) / 1024, 1)}


def field(time_report: str, name: str) -> str:
    """One value of `/usr/bin/time -v`'s report."""
    match = re.search(rf"{re.escape(name)}: ([\d.]+)", time_report)
    if not match:
        raise SystemExit(f"no {name!r} in the output of {TIME} -v:\n{time_report}")
    return match.group(1)


def intentlora_command() -> list[str]:
    """The installed `intentlora` script next to this Python (what the README runs), else `python -m intentlora.cli`."""
    script = Path(sys.executable).with_name("intentlora")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "intentlora.cli"]


def measure_conversion(model: str, work: Path, quiet: bool) -> dict:
    """The first run's extra step: converting the offline model into an empty cache, timed alone."""
    cache = work / "cold-cache"
    cache.mkdir()
    code = f"from intentlora.offline import resolve_offline; resolve_offline({model!r}, print)"
    try:
        figures = timed([sys.executable, "-c", code], work, env={**os.environ, "INTENTLORA_CACHE": str(cache)}, quiet=quiet)
        figures["size_mb"] = round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20, 1)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return figures


def run_quickstart(work: Path, extra: list[str], quiet: bool) -> tuple[dict, dict]:
    """`intentlora train` (plus `extra`, for --smoke) with `work` as the current folder: (timing, metrics.json)."""
    figures = timed([*intentlora_command(), "train", *extra], work, quiet=quiet)
    runs = sorted((work / "runs").glob("*/metrics.json"))
    if len(runs) != 1:
        raise SystemExit(f"expected one finished run under {work / 'runs'}, found {len(runs)}")
    return figures, json.loads(runs[0].read_text(encoding="utf-8"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = names[0].strip() if names else cpu
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        match = re.search(r"MemTotal:\s+(\d+) kB", meminfo.read_text())
        memory = f", {int(match.group(1)) / 2**20:.0f} GB RAM" if match else ""
    return f"{os.cpu_count()} CPU cores ({cpu}){memory}, no GPU" if not _has_cuda() else f"{os.cpu_count()} CPU cores, CUDA GPU"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def markdown(figures: dict, metrics: dict, conversion: dict | None, command: str) -> str:
    """The README's figures: machine, wall time, peak RSS, the one-time conversion, the table, the verdict."""
    from intentlora.report import comparison_rows, display_name, verdict

    lines = [
        f"Measured by `benchmarks/quickstart_figures.py` on {machine()}: `{command}` took "
        f"**{minutes(figures['wall_s'])}** ({minutes(figures['cpu_s'])} of CPU time) and peaked at "
        f"**{figures['peak_rss_mb'] / 1024:.1f} GB** of RAM (maximum resident set size, `/usr/bin/time -v`).",
    ]
    if conversion:
        lines.append(
            f"The first run also converts the model once into `~/.cache/intentlora` ({conversion['size_mb'] / 1024:.1f} GB on disk): "
            f"**{minutes(conversion['wall_s'])}** more, peaking at **{conversion['peak_rss_mb'] / 1024:.1f} GB**; later runs load it in seconds."
        )
    else:
        lines.append("The one-time model conversion was not measured (--skip-conversion or --smoke).")
    lines += ["", "| model | test macro-F1 | accuracy |", "|---|---|---|"]
    lines += [f"| {display_name(name)} | {m['macro_f1']:.3f} | {m['accuracy']:.3f} |" for name, m in comparison_rows(metrics)]
    lines += ["", *verdict(metrics)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, 32 train and 16 test texts: checks the script runs")
    parser.add_argument("--skip-conversion", action="store_true", help="do not time the one-time model conversion")
    parser.add_argument("--output", type=Path, default=None, help="keep the run (and figures.json) here instead of a temporary folder")
    parser.add_argument("--quiet", action="store_true", help="hide the quickstart's own output")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assignments",
                        help="passed to `intentlora train --set`: the quickstart with one setting changed (repeatable)")
    args = parser.parse_args()

    work = args.output or Path(tempfile.mkdtemp(prefix="quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        extra = []
        if args.smoke:
            from bench_train import smoke_model

            extra = ["--model", str(smoke_model(work / "tiny-model")), "--max-train-samples", "32", "--max-test-samples", "16", "--epochs", "1"]
        extra += [part for assignment in args.assignments for part in ("--set", assignment)]
        conversion = None
        if not (args.smoke or args.skip_conversion):
            from intentlora.config import Config

            conversion = measure_conversion(Config().model.name, work, args.quiet)
        figures, metrics = run_quickstart(work, extra, args.quiet)
        text = markdown(figures, metrics, conversion, " ".join(["intentlora", "train", *extra]))
        (work / "figures.json").write_text(json.dumps({"quickstart": figures, "conversion": conversion}, indent=2), encoding="utf-8")
        print(text)
    finally:
        if args.output is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
