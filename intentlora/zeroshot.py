"""Zero-shot baseline: the instruct model prompted with the intents, each label scored by likelihood.

No training, no generation to parse: every label's answer is scored after the
model's own chat prompt, and the likeliest wins. This is the honest "do I need
to fine-tune at all?" number next to LoRA.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from intentlora.data import Example
from intentlora.evaluate import classification_metrics
from intentlora.inference import autocast_for


ZERO_SHOT_INSTRUCTION = (
    "Classify the user's message into exactly one of these intents:\n{intents}\n"
    "Answer with the intent name only."
)


def zero_shot_prompts(tokenizer, texts: list[str], labels: list[str], descriptions: dict[str, str] | None) -> list[list[int]]:
    """Token ids of the instruct model's own chat prompt, one per text, ready for the answer."""
    descriptions = descriptions or {}
    intents = "\n".join(f"- {label}: {descriptions[label]}" if descriptions.get(label) else f"- {label}" for label in labels)
    instruction = ZERO_SHOT_INSTRUCTION.format(intents=intents)
    if tokenizer.chat_template:
        return [
            tokenizer.apply_chat_template(
                [{"role": "system", "content": instruction}, {"role": "user", "content": text}],
                add_generation_prompt=True, tokenize=True, return_dict=False,
            )
            for text in texts
        ]
    return [tokenizer(f"{instruction}\n\nMessage: {text}\nIntent: ", add_special_tokens=False)["input_ids"] for text in texts]


@torch.inference_mode()
def zero_shot_scores(model, tokenizer, texts: list[str], labels: list[str], descriptions: dict[str, str] | None = None, answer_rows: int = 256) -> torch.Tensor:
    """Log-likelihood of each label's answer after each prompt: shape (texts, labels).

    Every label is scored, so there is no free generation and nothing to parse.
    The answer ends with the end-of-turn token, so a label that is a prefix of
    another cannot win by stopping early. Each prompt runs once; its KV cache is
    repeated for the labels, which costs only the few answer tokens each.
    `answer_rows` (texts x labels per forward pass) bounds the repeated cache's memory.
    """
    model.eval()
    device = next(model.parameters()).device
    prompts = zero_shot_prompts(tokenizer, texts, labels, descriptions)
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    answers = [tokenizer(label, add_special_tokens=False)["input_ids"] + end for label in labels]
    n_labels, width = len(labels), max(map(len, answers))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answer_ids = torch.tensor([a + [pad] * (width - len(a)) for a in answers], device=device)
    answer_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers], device=device)
    first_tokens = answer_ids[:, 0]
    order = sorted(range(len(texts)), key=lambda i: len(prompts[i]))
    batch_size = max(1, answer_rows // n_labels)
    scores = torch.empty(len(texts), n_labels)
    with autocast_for(model):
        for start in tqdm(range(0, len(order), batch_size), desc="zero-shot", unit="batch", leave=False):
            rows = order[start : start + batch_size]
            longest = max(len(prompts[i]) for i in rows)
            # Left padding puts every prompt's last token in the last column;
            # RoPE sees only relative positions, so the shift changes nothing.
            ids = torch.tensor([[pad] * (longest - len(prompts[i])) + prompts[i] for i in rows], device=device)
            mask = torch.tensor([[0] * (longest - len(prompts[i])) + [1] * len(prompts[i]) for i in rows], device=device)
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            first = out.logits[:, -1].float().log_softmax(-1)[:, first_tokens]  # (batch, labels)
            cache = out.cache
            cache.batch_repeat_interleave(n_labels)
            rest = model(
                input_ids=answer_ids.repeat(len(rows), 1),
                attention_mask=torch.cat([mask.repeat_interleave(n_labels, 0), answer_mask.repeat(len(rows), 1)], 1),
                cache=cache,
            ).logits.float().log_softmax(-1)
            # Column j predicts answer token j + 1; padding columns are masked out.
            targets = answer_ids[:, 1:].repeat(len(rows), 1)
            token_lp = rest[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1) * answer_mask[:, 1:].repeat(len(rows), 1)
            scores[rows] = (first + token_lp.sum(-1).view(len(rows), n_labels)).cpu()
    return scores


def zero_shot_baseline(model, tokenizer, examples: list[Example], labels: list[str], descriptions: dict[str, str] | None = None) -> dict:
    scores = zero_shot_scores(model, tokenizer, [ex.text for ex in examples], labels, descriptions)
    label2id = {label: i for i, label in enumerate(labels)}
    return classification_metrics([label2id[ex.label] for ex in examples], scores.argmax(-1).tolist(), labels)
