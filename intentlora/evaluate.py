"""Metrics (scikit-learn) and evaluation of a model on labelled examples.

Macro-F1 averages over the labels that occur in the gold labels or the
predictions: a label with no test example and never predicted has no F1 to
average, and counting it as 0 would punish the model for the test set's gaps.
The per-class table lists every label, marked.
"""

from __future__ import annotations

import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from intentlora.data import Example
from intentlora.inference import DEFAULT_BATCH_SIZE, batched_logits


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro/weighted F1, per-class P/R/F1/support and the confusion matrix."""
    ids = list(range(len(labels)))
    present = sorted(set(gold) | set(pred))
    precision, recall, f1, support = precision_recall_fscore_support(gold, pred, labels=ids, zero_division=0)
    absent = [labels[i] for i in ids if i not in present]
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(gold, pred, labels=ids, average="weighted", zero_division=0)),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s), "present": i in present}
            for i, (label, p, r, f, s) in enumerate(zip(labels, precision, recall, f1, support))
        },
        # Labels neither in the gold labels nor predicted: left out of macro-F1.
        "absent_labels": absent,
        "confusion_matrix": confusion_matrix(gold, pred, labels=ids).tolist(),
        "n": len(gold),
    }


def metrics_from_probs(examples: list[Example], probs: torch.Tensor, labels: list[str]) -> dict:
    label2id = {label: i for i, label in enumerate(labels)}
    return classification_metrics([label2id[ex.label] for ex in examples], probs.argmax(-1).tolist(), labels)


def evaluate_model(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int = DEFAULT_BATCH_SIZE,
                   max_length: int = 128, pad_to_max_length: bool = False) -> tuple[dict, torch.Tensor]:
    """Metrics and the class probabilities behind them, rows in the order of `examples`."""
    probs = batched_logits(model, tokenizer, [ex.text for ex in examples], batch_size=batch_size, max_length=max_length,
                           pad_to_max_length=pad_to_max_length).softmax(-1)
    return metrics_from_probs(examples, probs, labels), probs


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
