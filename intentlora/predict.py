"""Batched inference: sort by length, pad per batch, return rows in input order."""

from __future__ import annotations

import contextlib

import torch
from transformers import PreTrainedModel


def autocast_for(model: torch.nn.Module):
    """bf16 weights need autocast so fp32 LoRA/head weights meet bf16 activations."""
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=dtype)


@torch.inference_mode()
def batched_logits(
    model: PreTrainedModel,
    tokenizer,
    texts: list[str],
    batch_size: int = 64,
    max_length: int = 128,
) -> torch.Tensor:
    """fp32 logits of shape (len(texts), num_labels), in the order of `texts`."""
    model.eval()
    device = next(model.parameters()).device
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(texts), model.config.num_labels)
    with autocast_for(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt").to(device)
            out[rows] = model(**batch).logits.float().cpu()
    return out
