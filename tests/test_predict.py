import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from intentlora import IntentClassifier, UnknownModelError
from intentlora.data import Problem
from intentlora.predict import CalibrationError, IncompleteRunError, calibrate, precision_curve, predict_file, write_calibration
from tests.conftest import THREE_LABELS, write_jsonl

TEXTS = ["查余额", "我的信用卡昨天在地铁上丢了，怎么挂失，急急急", "退款", "有人冒充客服让我转账，我是不是被骗了", "卡丢了", "你好"]


def scores_by_label(prediction) -> dict[str, float]:
    return {t["label"]: t["score"] for t in prediction.top_k}


def assert_same(predictions, expected, tol=1e-5):
    """Scores agree within `tol`; so must the labels, except where the expected top two are within 2 * tol
    (a tiny random model's near-ties legitimately swap under bf16)."""
    assert len(predictions) == len(expected)
    for p, e in zip(predictions, expected):
        assert scores_by_label(p).keys() == scores_by_label(e).keys()
        for label, score in scores_by_label(e).items():
            assert scores_by_label(p)[label] == pytest.approx(score, abs=tol)
        top, runner_up = (sorted(scores_by_label(e).values(), reverse=True) + [0.0])[:2]
        if top - runner_up > 2 * tol:
            assert p.label == e.label


def copy_run(run, tmp_path, name="run"):
    return shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))


@pytest.fixture(scope="module")
def classifier(tiny_run):
    return IntentClassifier.from_pretrained(tiny_run, device="cpu")


def test_a_run_and_its_export_predict_the_same(classifier, tiny_export):
    merged = IntentClassifier.from_pretrained(tiny_export)
    assert merged.models == classifier.models == ["default"]
    assert merged.labels() == classifier.labels() == ["balance", "card_lost", "fraud_risk", "other", "refund"]
    assert_same(merged.predict(TEXTS, top_k=5), classifier.predict(TEXTS, top_k=5))


@pytest.mark.parametrize("source", ["run", "export"])
def test_bf16_keeps_the_head_fp32_and_stays_close_to_fp32(classifier, tiny_run, tiny_export, source):
    import torch

    fast = IntentClassifier.from_pretrained(tiny_run if source == "run" else tiny_export, dtype="bf16")
    params = [(name, p.dtype) for name, p in fast._model.named_parameters() if "lora_" not in name]
    assert {dtype for name, dtype in params if ".score." in f".{name}"} == {torch.float32}
    assert {dtype for name, dtype in params if ".score." not in f".{name}"} == {torch.bfloat16}
    assert_same(fast.predict(TEXTS, top_k=5), classifier.predict(TEXTS, top_k=5), tol=0.05)


def test_packing_and_padding_to_max_length_change_the_shapes_not_the_logits(classifier):
    import torch

    from intentlora.inference import batched_logits, classifier_of, encode

    model, tokenizer = classifier._model, classifier._tokenizer
    shapes = []
    inner = classifier_of(model).model  # the transformer both paths run
    hook = inner.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(tuple((args or [kwargs["input_ids"]])[0].shape)), with_kwargs=True)
    try:
        packed = batched_logits(model, tokenizer, TEXTS, batch_size=2, max_length=48)
        # no padding: each batch of 2 texts runs as one sequence of their real tokens
        assert [rows for rows, _ in shapes] == [1, 1, 1] and sum(width for _, width in shapes) == sum(map(len, encode(tokenizer, TEXTS, 48)))
        shapes.clear()
        padded = batched_logits(model, tokenizer, TEXTS, batch_size=2, max_length=48, pad_to_max_length=True)
        assert shapes == [(2, 48)] * 3
    finally:
        hook.remove()
    torch.testing.assert_close(padded, packed, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_input_order_is_kept_whatever_the_batching(classifier, batch_size):
    alone = [classifier.predict([text], top_k=5)[0] for text in TEXTS]
    classifier.batch_size = batch_size
    try:
        assert_same(classifier.predict(TEXTS, top_k=5), alone)
        assert_same(classifier.predict(TEXTS[::-1], top_k=5), alone[::-1])
    finally:
        classifier.batch_size = 32


def test_top_k_is_sorted_and_checked(classifier):
    for p in classifier.predict(TEXTS, top_k=3):
        scores = [t["score"] for t in p.top_k]
        assert len(p.top_k) == 3 and scores == sorted(scores, reverse=True)
        assert (p.label, p.score, p.fallback) == (p.top_k[0]["label"], scores[0], False)
    full = classifier.predict(TEXTS[:1], top_k=5)[0]
    assert sum(t["score"] for t in full.top_k) == pytest.approx(1.0, abs=1e-5)
    assert full.to_dict() == {"label": full.label, "score": full.score, "top_k": full.top_k, "fallback": False}
    for bad in (0, 6):
        with pytest.raises(ValueError, match="top_k must be between 1 and 5"):
            classifier.predict(TEXTS, top_k=bad)


def test_bad_texts_are_refused_clearly(classifier):
    with pytest.raises(TypeError, match="not one string"):
        classifier.predict("查余额")
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        classifier.predict(["查余额", "  "])
    assert classifier.predict([]) == []


def test_below_the_threshold_the_fallback_label_is_given(tiny_run, classifier):
    plain = classifier.predict(TEXTS)
    threshold = sorted(p.score for p in plain)[len(plain) // 2]
    guarded = IntentClassifier.from_pretrained(tiny_run, threshold=threshold).predict(TEXTS)
    for p, g in zip(plain, guarded):
        assert g.fallback == (p.score < threshold)
        assert g.label == ("other" if g.fallback else p.label)
        assert (g.score, g.top_k) == (p.score, p.top_k)
    assert any(g.fallback for g in guarded) and not all(g.fallback for g in guarded)


def test_a_threshold_without_other_needs_a_fallback_label(tiny_run_3labels):
    with pytest.raises(ValueError, match="needs a fallback label"):
        IntentClassifier.from_pretrained(tiny_run_3labels, threshold=1.0)
    guarded = IntentClassifier.from_pretrained(tiny_run_3labels, threshold=1.0, fallback_label="out_of_scope")
    assert {p.label for p in guarded.predict(TEXTS)} == {"out_of_scope"}


def test_precision_curve_cuts_between_distinct_scores():
    cuts = precision_curve([0.6, 0.9, 0.8, 0.8], [False, True, False, True])
    assert cuts == [
        {"threshold": pytest.approx(0.85), "precision": 1.0, "coverage": 0.25},
        {"threshold": pytest.approx(0.7), "precision": pytest.approx(2 / 3), "coverage": 0.75},
        {"threshold": 0.0, "precision": 0.5, "coverage": 1.0},
    ]


def test_calibration_reaches_its_target_and_is_read_back(tiny_run, tmp_path, bundled_rows):
    run = copy_run(tiny_run, tmp_path)
    data = write_jsonl(tmp_path / "valid.jsonl", bundled_rows["test"][25:85])
    classifier = IntentClassifier.from_pretrained(run)
    texts, gold = [r["text"] for r in bundled_rows["test"][25:85]], [r["label"] for r in bundled_rows["test"][25:85]]
    plain = classifier.predict(texts)
    accuracy = sum(p.label == g for p, g in zip(plain, gold)) / len(gold)
    target = max(cut["precision"] for cut in precision_curve([p.score for p in plain], [p.label == g for p, g in zip(plain, gold)]))
    assert target > accuracy  # so the threshold has work to do

    result = calibrate(classifier, data, target)
    assert result["precision"] >= target and 0 < result["coverage"] < 1 and result["threshold"] > 0
    assert (result["fallback_label"], result["target_precision"], result["n"], result["data"]) == ("other", target, 60, str(data))
    write_calibration(run, result)

    calibrated = IntentClassifier.from_pretrained(run)
    kept = [(p, g) for p, g in zip(calibrated.predict(texts), gold) if not p.fallback]
    assert len(kept) / len(gold) == pytest.approx(result["coverage"])
    assert sum(p.label == g for p, g in kept) / len(kept) >= target
    overridden = IntentClassifier.from_pretrained(run, threshold=0.0).predict(texts)
    assert not any(p.fallback for p in overridden)


def test_calibration_keeps_its_precision_and_warns_when_used_in_another(tiny_run, tmp_path, bundled_rows, recwarn):
    run = copy_run(tiny_run, tmp_path)
    data = write_jsonl(tmp_path / "valid.jsonl", bundled_rows["test"][25:85])
    result = calibrate(IntentClassifier.from_pretrained(run, dtype="bf16"), data, 0.0)
    assert result["model_precision"] == "bf16"
    write_calibration(run, result)
    IntentClassifier.from_pretrained(run, dtype="bf16")
    assert not [w for w in recwarn if "calibration.json" in str(w.message)]
    with pytest.warns(UserWarning, match=r"picked in bf16, this model runs in fp32"):
        IntentClassifier.from_pretrained(run, dtype="fp32")
    IntentClassifier.from_pretrained(run, dtype="fp32", threshold=0.5)  # an explicit threshold is the caller's choice
    assert not [w for w in recwarn if "calibration.json" in str(w.message)]


def test_calibration_says_when_the_target_is_out_of_reach(classifier, tmp_path, bundled_rows):
    # Every row is out of scope: each kept prediction is wrong, whatever the threshold.
    data = write_jsonl(tmp_path / "oos.jsonl", [{"text": r["text"], "label": "out_of_scope"} for r in bundled_rows["test"][:10]])
    with pytest.raises(CalibrationError, match="no threshold reaches precision 0.5"):
        calibrate(classifier, data, 0.5, fallback_label="out_of_scope")


def test_adapters_share_one_base_and_keep_their_own_heads(tiny_run, tiny_run_3labels):
    both = IntentClassifier.from_pretrained(tiny_run, adapters={"three": tiny_run_3labels})
    assert both.models == ["default", "three"]
    assert both.labels("three") == THREE_LABELS and len(both.labels()) == 5
    five_alone = IntentClassifier.from_pretrained(tiny_run).predict(TEXTS, top_k=5)
    three_alone = IntentClassifier.from_pretrained(tiny_run_3labels).predict(TEXTS, top_k=3)
    for _ in range(2):  # switching back and forth changes nothing
        assert_same(both.predict(TEXTS, top_k=3, model="three"), three_alone)
        assert_same(both.predict(TEXTS, top_k=5), five_alone)
        assert_same(both.predict(TEXTS, top_k=5, model="default"), five_alone)
    adapters_only = IntentClassifier.from_pretrained(None, adapters={"bank": tiny_run, "three": tiny_run_3labels})
    assert adapters_only.models == ["bank", "three"]
    assert_same(adapters_only.predict(TEXTS, top_k=3, model="three"), three_alone)
    assert_same(adapters_only.predict(TEXTS, top_k=5), five_alone)


def test_concurrent_calls_to_different_adapters_stay_apart(tiny_run, tiny_run_3labels):
    both = IntentClassifier.from_pretrained(tiny_run, adapters={"three": tiny_run_3labels}, batch_size=2)
    expected = {name: both.predict(TEXTS, top_k=3, model=name) for name in both.models}
    with ThreadPoolExecutor(4) as pool:
        names = both.models * 6
        results = list(pool.map(lambda name: both.predict(TEXTS, top_k=3, model=name), names))
    for name, result in zip(names, results):
        assert_same(result, expected[name], tol=0)


def test_adapters_of_another_base_are_refused(tiny_run, tiny_run_3labels, tmp_path):
    other = copy_run(tiny_run_3labels, tmp_path)
    config = (other / "config.yaml").read_text(encoding="utf-8")
    (other / "config.yaml").write_text(config.replace("name: ", "name: other-", 1), encoding="utf-8")
    with pytest.raises(ValueError, match="adapters must share one base model"):
        IntentClassifier.from_pretrained(tiny_run, adapters={"three": other})
    with pytest.raises(ValueError, match="'default' is taken"):
        IntentClassifier.from_pretrained(tiny_run, adapters={"default": tiny_run_3labels})


def test_an_incomplete_run_is_refused(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    (run / "metrics.json").unlink()
    with pytest.raises(IncompleteRunError, match="incomplete run .no metrics.json."):
        IntentClassifier.from_pretrained(run)
    with pytest.raises(IncompleteRunError, match="incomplete run"):
        IntentClassifier.from_pretrained(tiny_run, adapters={"crashed": run})
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        IntentClassifier.from_pretrained(tmp_path / "nope")


def test_a_merged_folder_takes_no_adapters_and_a_base_model_is_no_classifier(tiny_export, tiny_run, tiny_qwen2):
    with pytest.raises(ValueError, match="cannot take adapters"):
        IntentClassifier.from_pretrained(tiny_export, adapters={"x": tiny_run})
    with pytest.raises(ValueError, match="not a classifier"):
        IntentClassifier.from_pretrained(tiny_qwen2)


def test_an_unknown_model_name_is_a_key_error(classifier):
    with pytest.raises(UnknownModelError, match="unknown model 'bank'; loaded: default") as caught:
        classifier.predict(TEXTS, model="bank")
    assert isinstance(caught.value, KeyError)
    with pytest.raises(KeyError):
        classifier.labels("bank")


def test_predict_file_streams_in_order_and_reports_bad_lines(classifier, tmp_path):
    source = tmp_path / "in.jsonl"
    good = [{"id": i, "text": TEXTS[i % len(TEXTS)] * (1 + i % 3)} for i in range(10)]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    lines[3:3] = [b"{not json", b'{"text": ""}', b'{"id": 99}', b'["a list"]', b"\xff\xfe", b""]
    source.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    problems: list[Problem] = []
    counts = predict_file(classifier, source, tmp_path / "out" / "out.jsonl", top_k=2, chunk_lines=3, report=problems.append)
    assert (counts.predicted, counts.bad) == (10, 5)
    assert [str(p) for p in problems] == [
        f"{source}:4: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{source}:5: field 'text' is empty",
        f"{source}:6: missing field 'text'",
        f"{source}:7: expected a JSON object, got array",
        f"{source}:8: not valid UTF-8 (byte 0xff at column 1); save the file as UTF-8",
    ]
    written = [json.loads(line) for line in (tmp_path / "out" / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in row.items() if k != "prediction"} for row in written] == good
    expected = classifier.predict([r["text"] for r in good], top_k=2)
    assert [row["prediction"]["label"] for row in written] == [p.label for p in expected]
    assert [row["prediction"]["score"] for row in written] == pytest.approx([p.score for p in expected], abs=1e-5)
