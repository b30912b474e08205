"""The one forward loop every score goes through: training's checks, evaluation, `predict`, `serve`.

Texts run sorted by length (a batch pads to its own longest text), under
autocast when the weights are half precision, on the model's device. The
precision and device rules live here too, so `train`, `eval` and `predict`
cannot pick them differently.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

# What `predict`, `eval`, `calibrate`, `serve` and the run's own final
# evaluation use unless told otherwise: one default, so the score a run
# reports is the score of what users load.
DEFAULT_PRECISION = "fp32"
DEFAULT_BATCH_SIZE = 16  # on CPU, 16-32 beat 64+ (activations stay in cache); see docs/BENCHMARKS.md


def resolve_precision(precision: str, device: str | torch.device | None = None) -> str:
    """`auto` is bf16 where the hardware computes it natively, else fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision
    if resolve_device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def precision_dtype(precision: str, device: str | torch.device | None = None) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_precision(precision, device)]


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`auto` (or None): the first CUDA GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_for(model: torch.nn.Module):
    """bf16 weights need autocast so fp32 LoRA/head weights meet bf16 activations."""
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=model_device(model).type, dtype=dtype)


@torch.inference_mode()
def batched_logits(
    model,
    tokenizer,
    texts: list[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = 128,
    pad_to_max_length: bool = False,
    progress=None,
    prompt_template: str | None = None,
) -> torch.Tensor:
    """fp32 logits of shape (len(texts), num_labels) on the CPU, in the order of `texts`.

    Texts run sorted by length, so a batch pads to its own longest text;
    `pad_to_max_length` pads all to `max_length` (only to reproduce the reference).
    `prompt_template` ("...{text}...") wraps each text as the run trained on it.
    `progress(n)` is called after each batch with its number of texts.
    """
    model.eval()
    if not texts:
        return torch.empty(0, model.config.num_labels)
    device = model_device(model)
    encoded = encode(tokenizer, texts, max_length, prompt_template)
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
            if progress is not None:
                progress(len(rows))
    return out


def apply_template(texts, prompt_template: str | None) -> list[str]:
    """The text as the model sees it: wrapped in the run's prompt template, if it has one."""
    return [prompt_template.replace("{text}", text) for text in texts] if prompt_template else list(texts)


def encode(tokenizer, texts, max_length: int, prompt_template: str | None = None) -> list[list[int]]:
    """Token ids, truncated to `max_length`: the one tokenization training, evaluation and serving share."""
    return tokenizer(apply_template(texts, prompt_template), truncation=True, max_length=max_length)["input_ids"]


def count_truncated(tokenizer, texts: list[str], max_length: int) -> int:
    """Texts longer than `max_length` tokens: the model sees only their start."""
    lengths = tokenizer(list(texts), truncation=False)["input_ids"]
    return sum(len(ids) > max_length for ids in lengths)
