"""The one forward loop every score goes through: training's checks, evaluation, `predict`, `serve`.

Texts run sorted by length (a batch pads to its own longest text), under
autocast when the weights are half precision, on the model's device. The
precision and device rules live here too, so `train`, `eval` and `predict`
cannot pick them differently.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import time
from pathlib import Path

import torch

from intentlora.config import PRECISIONS, TRAINING_PRECISIONS
from intentlora.files import write_text_atomic

# What `predict`, `eval`, `calibrate`, `serve` and the run's own final
# evaluation use unless told otherwise: one default, so the score a run
# reports is the score of what users load.
DEFAULT_PRECISION = "fp32"
DEFAULT_BATCH_SIZE = 16  # on CPU, 16-32 beat 64+ (activations stay in cache); see docs/BENCHMARKS.md
# Padded tokens per forward pass: past this a CPU forward costs in proportion, and activations leave the cache.
DEFAULT_MAX_TOKENS = 512


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_precision(precision: str, device: str | torch.device | None = None, training: bool = False) -> str:
    """`auto` is bf16 where the hardware computes it natively and faster than fp32 (on a CPU: timed once per machine).

    Elsewhere `auto` is fp32, except for training on a CPU: there it is bf16-weights, the base read in bf16 and
    computed in fp32, which scored like bf16 on the quality suite at fp32's speed (docs/QUALITY.md)."""
    allowed = TRAINING_PRECISIONS if training else PRECISIONS
    if precision not in allowed:
        raise ValueError(f"precision must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {precision!r}")
    if precision != "auto":
        return precision
    if resolve_device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if cpu_has_native_bf16() and cpu_bf16_pays():
        return "bf16"
    return "bf16-weights" if training else "fp32"


def precision_dtype(precision: str, device: str | torch.device | None = None) -> torch.dtype:
    return DTYPES[resolve_precision(precision, device)]


def training_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(the dtype the base's weights are read in, the dtype it computes in) for a resolved training precision."""
    return (torch.bfloat16, torch.float32) if precision == "bf16-weights" else (DTYPES[precision], DTYPES[precision])


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: the CPU runs bf16, which is not yet a promise of speed (cpu_bf16_pays)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# Measured: LoRA training in bf16 ran 1.55x faster than fp32 on an AMD EPYC, and 0.61x as fast on an Intel Xeon with
# AVX512-BF16 and no AMX, whose bf16 matrix products reach 165 GFLOP/s against fp32's 265 (docs/BENCHMARKS.md).
BF16_MIN_SPEEDUP = 1.1  # below this, fp32's exactness is worth more than the time


@functools.cache
def cpu_bf16_pays() -> bool:
    """Whether bf16 beats fp32 on this CPU: an MLP-sized layer's forward and backward timed both ways, once per
    machine (CPU, torch version, threads), and remembered in the model cache so that every later run decides alike."""
    from intentlora.offline import cache_dir

    key = f"{cpu_model_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = cache_dir() / "cpu_bf16.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = {"bf16_speedup": round(time_layer(torch.float32) / time_layer(torch.bfloat16), 3)}
        with contextlib.suppress(OSError):  # a read-only cache: measure again next time
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(known, indent=2))
    return known[key]["bf16_speedup"] >= BF16_MIN_SPEEDUP


def time_layer(dtype: torch.dtype, tokens: int = 192, size: tuple[int, int] = (896, 4864), repeats: int = 5) -> float:
    """Seconds for one forward and input-gradient backward of a frozen linear layer (a 0.5B MLP projection, a
    batch of short texts) in `dtype`; the best of `repeats`, after a warm-up."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(size[1], size[0], generator=generator) * 0.02).to(dtype)
    inputs = torch.randn(tokens, size[0], generator=generator, requires_grad=True)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = torch.nn.functional.linear(inputs, weight)
        out.float().sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return min(times)


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
def batched_logits(model, tokenizer, texts: list[str], **options) -> torch.Tensor:
    """fp32 logits of shape (len(texts), num_labels) on the CPU, in the order of `texts`.

    `options` are those of `logits_in_batches`: texts are tokenized in one
    call and run sorted by length, so a batch pads to its own longest text; a
    batch holds at most `batch_size` texts and `max_tokens` padded tokens.
    Decoder classifiers that read the last token (Qwen2, Llama, ...) skip
    padding altogether: the batch's texts run packed in one sequence
    (`packed_logits`). `pad_to_max_length` pads all to `max_length` (only to
    reproduce the reference). `prompt_template` ("...{text}...") wraps each
    text as the run trained on it. `progress(n)` is called after each batch
    with its number of texts.
    """
    model.eval()
    if not texts:
        return torch.empty(0, model.config.num_labels)
    device = model_device(model)
    packable = can_pack(model)

    def forward(batch: list[list[int]], pad_to: int | None) -> torch.Tensor:
        if packable and pad_to is None:
            return packed_logits(model, batch, device).float().cpu()
        return model(**pad_batch(tokenizer, batch, "pt", pad_to).to(device)).logits.float().cpu()

    with autocast_for(model):
        return logits_in_batches(forward, tokenizer, texts, **options)


def logits_in_batches(
    forward,
    tokenizer,
    texts: list[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = 128,
    pad_to_max_length: bool = False,
    progress=None,
    prompt_template: str | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> torch.Tensor:
    """The batch loop of every backend (torch here, ONNX Runtime in `onnx_export`): texts encoded in one call, run in
    length-sorted batches of at most `batch_size` texts and `max_tokens` tokens; `forward(token_id_lists, pad_to)`
    returns a batch's fp32 CPU logits (`pad_to`: a length to pad to, or None for the batch's longest), put back in
    the order of `texts`."""
    encoded = encode(tokenizer, texts, max_length, prompt_template)
    pad_to = max_length if pad_to_max_length else None
    out = None  # sized by the first batch: with several adapters the active head knows the label count, not model.config
    for rows in length_batches([len(ids) for ids in encoded], batch_size, None if pad_to_max_length else max_tokens):
        logits = forward([encoded[i] for i in rows], pad_to)
        if out is None:
            out = torch.empty(len(texts), logits.shape[-1])
        out[rows] = logits
        if progress is not None:
            progress(len(rows))
    return out if out is not None else torch.empty(0, 0)


def pad_batch(tokenizer, batch: list[list[int]], tensors: str, max_length: int | None = None):
    """input_ids and attention_mask padded to the batch's longest text, or to `max_length` when given (the reference)."""
    padding = {"padding": "max_length", "max_length": max_length} if max_length else {}
    return tokenizer.pad({"input_ids": batch}, return_tensors=tensors, **padding)


def classifier_of(model):
    """The transformers classifier inside a PEFT wrapper (LoRA layers injected in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def can_pack(model) -> bool:
    """Decoder classifiers that score the last real token (transformers' generic head) run packed,
    with an attention that takes a custom mask (SDPA, eager; not flash-attention's varlen kernels)."""
    from transformers.modeling_layers import GenericForSequenceClassification

    classifier = classifier_of(model)
    return isinstance(classifier, GenericForSequenceClassification) and classifier.config._attn_implementation in ("sdpa", "eager")


@torch.inference_mode()
def packed_logits(model, batch: list[list[int]], device) -> torch.Tensor:
    """Logits of several texts run as one sequence with no padding: (texts, labels).

    Each text attends only to itself (a block-diagonal causal mask) and its
    positions start at 0, so each gets what it would get alone, and the
    forward costs the batch's real tokens, not texts x its longest text: the
    difference matters most for a server's micro-batch, whose texts have
    whatever lengths the clients sent. The head reads each text's last token
    that is not the pad token, as transformers' padded forward does.
    """
    classifier = classifier_of(model)
    lengths = torch.tensor([len(ids) for ids in batch])
    ids = torch.tensor([[token for ids in batch for token in ids]])
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0)
    text_of = torch.repeat_interleave(torch.arange(len(batch)), lengths)
    mask = (text_of[:, None] == text_of[None, :]) & torch.ones(len(text_of), len(text_of), dtype=torch.bool).tril()
    hidden = getattr(classifier, classifier.base_model_prefix)(
        input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=attention_mask_for(model, mask[None, None]).to(device),
        use_cache=False,
    ).last_hidden_state[0]
    pad = classifier.config.get_text_config().pad_token_id
    starts = lengths.cumsum(0) - lengths
    last = [start + max((k for k, token in enumerate(ids) if token != pad), default=0) for start, ids in zip(starts.tolist(), batch)]
    return classifier.score(hidden[torch.tensor(last, device=hidden.device)])


def attention_mask_for(model, mask: torch.Tensor) -> torch.Tensor:
    """A boolean (batch, 1, query, key) mask as the model's attention takes it: SDPA as is, eager as additive scores."""
    if classifier_of(model).config._attn_implementation == "sdpa":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def length_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped for forward passes: sorted by length, at most `batch_size` texts and `max_tokens` padded tokens each.

    Sorting makes each batch pad only to texts of nearly its own length; the
    token bound keeps a batch of long texts from costing what many short ones
    would (a CPU forward costs about its padded token count), and a single text
    longer than the bound still runs, alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, rows = [], []
    for i in order:
        if rows and (len(rows) == batch_size or (max_tokens and (len(rows) + 1) * lengths[i] > max_tokens)):
            batches.append(rows)
            rows = []
        rows.append(i)
    if rows:
        batches.append(rows)
    return batches


def apply_template(texts, prompt_template: str | None) -> list[str]:
    """The text as the model sees it: wrapped in the run's prompt template, if it has one."""
    return [prompt_template.replace("{text}", text) for text in texts] if prompt_template else list(texts)


def encode(tokenizer, texts, max_length: int, prompt_template: str | None = None) -> list[list[int]]:
    """Token ids, truncated to `max_length`: the one tokenization training, evaluation and serving share.

    With a template, a text that does not fit is cut (by whole tokens of the
    text alone) until the templated string fits, so the template's end, where
    the model answers, is never cut. What fits is tokenized as one string: the
    ids are those of `apply_template(texts)`, what a client of the export sends.
    """
    if not prompt_template:
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ids = tokenizer(apply_template(texts, prompt_template))["input_ids"]
    for i, text in enumerate(texts):
        if len(ids[i]) > max_length:
            ids[i] = fit_text(tokenizer, text, prompt_template, max_length)
    return ids


def fit_text(tokenizer, text: str, prompt_template: str, max_length: int) -> list[int]:
    """The ids of the template around the longest start of `text` that fits in `max_length` tokens."""
    pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(pieces)
    while True:
        ids = tokenizer(prompt_template.replace("{text}", tokenizer.decode(pieces[:keep])))["input_ids"]
        over = len(ids) - max_length
        if over <= 0:
            return ids
        if keep == 0:
            raise ValueError(f"data.prompt_template alone is {over + max_length} tokens, more than data.max_length={max_length}: "
                             "shorten the template or raise max_length")
        keep = max(keep - over, 0)


def count_truncated(tokenizer, texts: list[str], max_length: int) -> int:
    """Texts longer than `max_length` tokens: the model sees only their start."""
    lengths = tokenizer(list(texts), truncation=False)["input_ids"]
    return sum(len(ids) > max_length for ids in lengths)
