"""CPU deployment with ONNX Runtime: `export --format onnx [--quantize int8]` and the backend that loads it.

The folder holds what a torch export holds (config.json with the labels,
labels.json, the tokenizer, intentlora.json with the run's inference
settings, calibration.json) plus model.onnx, whose presence makes
`IntentClassifier.from_pretrained` choose this backend. Texts go through the
same tokenization, length sorting and batching as the torch path
(one loop, `inference.logits_in_batches`), so only the forward differs.

Optimum's ONNX exporter (optimum-onnx 0.1) requires transformers < 4.58, so
the merged model is exported with torch.onnx's TorchScript exporter (eager
attention, dynamic batch and length) and quantized with onnxruntime's own
dynamic int8 quantization (per-channel int8 weights for every MatMul;
activations quantized on the fly).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from intentlora.inference import logits_in_batches, pad_batch

ONNX_FILE = "model.onnx"
ONNX_INFO_FILE = "onnx.json"  # how the graph was made: quantization, opset
QUANTIZE = (None, "int8")
OPSET = 17


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the ONNX backend needs onnxruntime and onnx: pip install 'intentlora[onnx]'") from None
    return onnxruntime


def is_onnx_folder(path: str | Path) -> bool:
    return (Path(path) / ONNX_FILE).is_file()


def export_onnx(run_dir: str | Path, out_dir: str | Path, quantize: str | None = None, allow_pickle: bool = False) -> Path:
    """Merge the run (as `export` does), then write it as an ONNX folder; `quantize="int8"` for int8 weights.

    `run_dir` may also be a folder written by `export`: a torch one is
    converted, an fp32 ONNX one quantized without exporting again.
    """
    from intentlora.files import staged_dir
    from intentlora.models import merge_run
    from intentlora.rundir import is_run_dir

    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(str(q) for q in QUANTIZE)}, got {quantize!r}")
    require_onnxruntime()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=out_dir.parent) as tmp:
        source = merge_run(run_dir, Path(tmp) / "merged", allow_pickle) if is_run_dir(run_dir) else run_dir
        with staged_dir(out_dir) as stage:
            for item in source.iterdir():  # tokenizer, config, labels, intentlora.json, calibration.json: not the weights
                if item.is_file() and not is_weights(item.name):
                    shutil.copyfile(item, stage / item.name)
            if is_onnx_folder(source):
                graph = source / ONNX_FILE
            else:
                graph = Path(tmp) / "fp32" / ONNX_FILE
                graph.parent.mkdir()
                export_graph(source, graph)
            if quantize == "int8":
                quantize_int8(graph, stage / ONNX_FILE)
            else:
                for item in graph.parent.glob(ONNX_FILE + "*"):
                    shutil.copyfile(item, stage / item.name)
            (stage / ONNX_INFO_FILE).write_text(json.dumps({"quantize": quantize, "opset": OPSET}, indent=2), encoding="utf-8")
            umask = os.umask(0)
            os.umask(umask)
            for item in stage.iterdir():  # onnx writes its weights 0600: readable as the other files are
                item.chmod(0o666 & ~umask)
    return out_dir


def is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name.startswith(ONNX_FILE) or name in (ONNX_INFO_FILE, "model.safetensors.index.json")


class _Logits(torch.nn.Module):
    """The classifier's forward as ONNX sees it: two integer inputs, one output, no cache."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_graph(folder: Path, target: Path) -> None:
    """The fp32 classifier in `folder` as an ONNX graph with dynamic batch and length (weights in one side file)."""
    import warnings

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # Two texts of different lengths: the trace sees padding, so the last-real-token lookup is traced generally.
    sample = tokenizer(["a b c d", "a"], padding=True, return_tensors="pt")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            _Logits(model), (sample["input_ids"], sample["attention_mask"]), str(target),
            input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=OPSET, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}, "logits": {0: "batch"}},
        )
    import onnx

    onnx.save_model(onnx.load(str(target)), str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_FILE + ".data", size_threshold=1024)


# Linear layers left in fp32 by the int8 export: the head (few weights, all of the decision) and the MLP
# down-projections, whose inputs carry Qwen2's outlier channels (dynamic int8 with everything quantized lost
# 4.4 macro-F1 points on the 0.5B: docs/BENCHMARKS.md).
FP32_LAYERS = ("/score/", "/mlp/down_proj/")


def quantize_int8(source: Path, target: Path, keep_fp32: tuple[str, ...] = FP32_LAYERS) -> None:
    """Dynamic int8: the weights of the linear layers per output channel, but those named in `keep_fp32`;
    the embedding stays fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    exclude = [node.name for node in graph.node if node.op_type == "MatMul" and any(part in node.name for part in keep_fp32)]
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=exclude, use_external_data_format=True)
    for extra in target.parent.glob(target.name + "*.data"):  # name the side file as the fp32 export does
        os.replace(extra, target.parent / (ONNX_FILE + ".data"))
    fix_external_location(target, ONNX_FILE + ".data")


def fix_external_location(graph: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(graph))


class OnnxModel:
    """An ONNX Runtime session with the classifier's labels: what IntentClassifier holds instead of a torch model."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        info = folder / ONNX_INFO_FILE
        self.quantize = json.loads(info.read_text(encoding="utf-8")).get("quantize") if info.is_file() else None

    def logits(self, tokenizer, texts: list[str], **options) -> torch.Tensor:
        """`inference.batched_logits` with this session as the forward: same options, same batches."""

        def forward(batch: list[list[int]], pad_to: int | None) -> torch.Tensor:
            inputs = pad_batch(tokenizer, batch, "np", pad_to)
            feed = {"input_ids": inputs["input_ids"].astype("int64"), "attention_mask": inputs["attention_mask"].astype("int64")}
            return torch.from_numpy(self.session.run(["logits"], feed)[0]).float()

        return logits_in_batches(forward, tokenizer, texts, **options)


def load_onnx(path: Path):
    """(OnnxModel, tokenizer, labels, inference settings) of a folder written by `export --format onnx`."""
    from transformers import AutoConfig

    from intentlora.models import load_tokenizer
    from intentlora.rundir import read_inference_settings

    config = AutoConfig.from_pretrained(path)  # id2label: the head's order, as the torch path reads it
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return OnnxModel(path), load_tokenizer(str(path)), labels, read_inference_settings(path)
