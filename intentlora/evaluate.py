"""Metrics (scikit-learn) and evaluation of a model on labelled examples."""

from __future__ import annotations

import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from tqdm.auto import tqdm

from intentlora.data import Example
from intentlora.predict import autocast_for, batched_logits


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro/weighted F1, per-class P/R/F1/support and the confusion matrix."""
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(gold, pred, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(gold, pred, labels=ids, average="weighted", zero_division=0)),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(gold, pred, labels=ids).tolist(),
        "n": len(gold),
    }


def evaluate_model(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int = 16, max_length: int = 128,
                   pad_to_max_length: bool = False) -> tuple[dict, torch.Tensor]:
    """Metrics and the class probabilities behind them, rows in the order of `examples`."""
    probs = batched_logits(model, tokenizer, [ex.text for ex in examples], batch_size, max_length, pad_to_max_length).softmax(-1)
    label2id = {label: i for i, label in enumerate(labels)}
    gold = [label2id[ex.label] for ex in examples]
    return classification_metrics(gold, probs.argmax(-1).tolist(), labels), probs


def misclassified(examples: list[Example], probs: torch.Tensor, labels: list[str]) -> list[dict]:
    """Every wrong prediction with gold, predicted, confidence and where the row came from."""
    rows = []
    for ex, p in zip(examples, probs):
        pred = int(p.argmax())
        if labels[pred] != ex.label:
            rows.append({"source": ex.source, "text": ex.text, "gold": ex.label, "predicted": labels[pred],
                         "confidence": round(float(p[pred]), 4), "gold_probability": round(float(p[labels.index(ex.label)]), 4)})
    return rows


def tfidf_baseline(train: list[Example], test: list[Example], labels: list[str]) -> dict:
    """Character n-gram TF-IDF + logistic regression: the classical bar LoRA has to clear.

    Character n-grams need no word segmentation, so Chinese works as well as English.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    label2id = {label: i for i, label in enumerate(labels)}
    pipeline = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True),
        LogisticRegression(C=10.0, max_iter=2000),
    )
    pipeline.fit([ex.text for ex in train], [label2id[ex.label] for ex in train])
    pred = pipeline.predict([ex.text for ex in test]).tolist()
    return classification_metrics([label2id[ex.label] for ex in test], pred, labels)


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


def evaluate_file(data: str, model: str | None = None, adapter: str | None = None, labels: list[str] | None = None,
                  descriptions: dict[str, str] | None = None, batch_size: int = 16, max_length: int = 128,
                  allow_pickle: bool = False) -> tuple[str, dict]:
    """Evaluate a saved run (base + adapter), a merged classifier, or a base model (zero-shot).

    Returns (what was evaluated, metrics). The file is checked against the
    model's own label set, so a mismatch is reported as FILE:LINE errors.
    """
    from intentlora.data import DataError, load_file
    from intentlora.models import load_causal_lm, load_merged_classifier, load_run, load_tokenizer, precision_dtype, resolve_model_path

    if adapter:
        classifier, tokenizer, labels = load_run(adapter, precision_dtype("auto"), base=model, allow_pickle=allow_pickle)
        kind = "lora"
    else:
        if not model:
            raise ValueError("give --model (a merged model or a base model) or --adapter RUN_DIR")
        path = resolve_model_path(model)
        loaded = load_merged_classifier(path, allow_pickle=allow_pickle)
        if loaded:
            classifier, tokenizer, labels = loaded
            kind = "classifier"
        else:
            classifier, tokenizer, kind = None, load_tokenizer(path), "zero_shot"
    result = load_file(data, labels)
    if result.errors:
        raise DataError(result.errors)
    if labels is None:
        labels = sorted({ex.label for ex in result.examples})
    if classifier is not None:
        metrics, _ = evaluate_model(classifier, tokenizer, result.examples, labels, batch_size, max_length)
    else:
        if not tokenizer.chat_template:
            raise ValueError(f"{model}: not a classifier and has no chat template, so it cannot be prompted zero-shot")
        lm = load_causal_lm(path, precision_dtype("auto"), allow_pickle=allow_pickle)
        metrics = zero_shot_baseline(lm, tokenizer, result.examples, labels, descriptions)
    metrics["labels"] = labels
    return kind, metrics
