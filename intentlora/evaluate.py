"""Metrics (scikit-learn) and evaluation of a model on labelled examples."""

from __future__ import annotations

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from intentlora.data import Example
from intentlora.predict import batched_logits


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


def evaluate_model(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int = 64, max_length: int = 128) -> dict:
    logits = batched_logits(model, tokenizer, [ex.text for ex in examples], batch_size, max_length)
    label2id = {label: i for i, label in enumerate(labels)}
    gold = [label2id[ex.label] for ex in examples]
    return classification_metrics(gold, logits.argmax(-1).tolist(), labels)
