"""The ONNX Runtime export: same predictions as torch fp32, same labels, calibration and settings; loaded by predict and serve."""

from __future__ import annotations

import collections
import json
import shutil

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from intentlora import IntentClassifier
from intentlora.cli import EXIT_USAGE, app as cli
from intentlora.onnx_export import OnnxModel, export_onnx
from intentlora.rundir import read_inference_settings, write_calibration
from intentlora.serve import build_app

pytest.importorskip("onnxruntime", reason="the ONNX backend is optional: pip install 'intentlora[onnx]'")

TEXTS = ["查余额", "我的信用卡昨天在地铁上丢了，怎么挂失，急急急", "退款", "有人冒充客服让我转账，我是不是被骗了", "卡丢了", "你好"]


@pytest.fixture(scope="module")
def calibrated_run(tiny_run, tmp_path_factory):
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("onnx-run") / "run", ignore=shutil.ignore_patterns("checkpoints"))
    write_calibration(run, {"threshold": 0.3, "fallback_label": "other"})
    return run


@pytest.fixture(scope="module")
def onnx_fp32(calibrated_run, tmp_path_factory):
    return export_onnx(calibrated_run, tmp_path_factory.mktemp("onnx") / "fp32")


def test_onnx_fp32_predicts_what_torch_fp32_predicts(calibrated_run, onnx_fp32, bundled_rows):
    torch_classifier = IntentClassifier.from_pretrained(calibrated_run, dtype="fp32", device="cpu")
    onnx_classifier = IntentClassifier.from_pretrained(onnx_fp32)
    assert isinstance(onnx_classifier._model, OnnxModel)
    texts = TEXTS + [r["text"] for r in bundled_rows["test"]]
    expected, got = torch_classifier.probabilities(texts), onnx_classifier.probabilities(texts)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    assert (got - expected).abs().max().item() < 1e-4
    assert onnx_classifier.labels() == torch_classifier.labels()
    # calibration.json and intentlora.json came along: the same threshold, fallback and truncation
    route, reference = onnx_classifier._route(None), torch_classifier._route(None)
    assert (route.threshold, route.fallback_label) == (reference.threshold, reference.fallback_label) == (0.3, "other")
    assert route.settings == reference.settings == read_inference_settings(onnx_fp32)
    assert [p.to_dict()["label"] for p in onnx_classifier.predict(texts)] == [p.label for p in torch_classifier.predict(texts)]


def test_onnx_int8_quantizes_the_linear_layers_and_mostly_agrees(calibrated_run, onnx_fp32, tmp_path):
    int8 = export_onnx(onnx_fp32, tmp_path / "int8", quantize="int8")  # an export folder works as the source too
    import onnx

    ops = collections.Counter(node.op_type for node in onnx.load(str(int8 / "model.onnx"), load_external_data=False).graph.node)
    # 2 layers x 6 projections run in int8; left in fp32: attention's 4 (activations x activations), 2 down_proj, the head
    assert ops["MatMulInteger"] == 12 and ops["MatMul"] == 4 + 2 + 1 and ops["DynamicQuantizeLinear"] > 0
    assert all(f.stat().st_mode & 0o044 for f in int8.iterdir()), "exports are readable like the other files"
    assert json.loads((int8 / "onnx.json").read_text())["quantize"] == "int8"
    fp32 = IntentClassifier.from_pretrained(onnx_fp32).probabilities(TEXTS)
    with pytest.warns(UserWarning, match="picked in fp32, this model runs in onnx-int8"):  # the run's threshold came along
        quantized = IntentClassifier.from_pretrained(int8).probabilities(TEXTS)
    assert quantized.shape == fp32.shape and (quantized - fp32).abs().max().item() < 0.1


def test_cli_exports_onnx_and_predict_and_serve_load_it(calibrated_run, onnx_fp32, tmp_path):
    out = tmp_path / "cli-onnx"
    result = CliRunner().invoke(cli, ["export", str(calibrated_run), str(out), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").is_file() and (out / "calibration.json").is_file() and (out / "labels.json").is_file()
    result = CliRunner().invoke(cli, ["predict", "--model", str(out), "--json", "查余额"])
    assert result.exit_code == 0, result.output
    expected = IntentClassifier.from_pretrained(calibrated_run, device="cpu").predict(["查余额"])[0]
    assert json.loads(result.output.strip().splitlines()[-1])["label"] == expected.label
    with TestClient(build_app(IntentClassifier.from_pretrained(onnx_fp32))) as client:
        response = client.post("/v1/classify", json={"texts": ["查余额"]})
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == expected.label


@pytest.mark.parametrize("args", [["--quantize", "int8"], ["--format", "tflite"], ["--format", "onnx", "--quantize", "int4"]])
def test_cli_export_refuses_bad_format_options(tiny_run, tmp_path, args):
    result = CliRunner().invoke(cli, ["export", str(tiny_run), str(tmp_path / "x"), *args])
    assert result.exit_code == EXIT_USAGE and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
