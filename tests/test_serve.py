"""The HTTP service: the library's predictions, per-adapter routing, limits, the API key, load, and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from intentlora.cli import EXIT_INPUT, app as cli
from intentlora.predict import IntentClassifier
from intentlora.serve import build_app
from tests.conftest import THREE_LABELS

KEY = "s3cret-key"


class Recording:
    """Wraps a classifier: records each batch's size, fails any batch holding the text 'boom', waits while `gate` is closed."""

    def __init__(self, classifier: IntentClassifier) -> None:
        self.classifier = classifier
        self.models = classifier.models
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def labels(self, model: str | None = None) -> list[str]:
        return self.classifier.labels(model)

    def probabilities(self, texts: list[str], model: str | None = None):
        self.batch_sizes.append(len(texts))
        self.gate.wait(30)
        if "boom" in texts:
            raise RuntimeError("the model broke at /secret/path")
        return self.classifier.probabilities(texts, model=model)

    def predictions(self, probs, top_k: int = 1, model: str | None = None):
        return self.classifier.predictions(probs, top_k, model)


@pytest.fixture(scope="module")
def classifier(tiny_run: Path, tiny_run_3labels: Path) -> IntentClassifier:
    return IntentClassifier.from_pretrained(tiny_run, adapters={"three": str(tiny_run_3labels)})


@pytest.fixture(scope="module")
def texts(bundled_rows) -> list[str]:
    return [r["text"] for r in bundled_rows["test"]]


@pytest.fixture
def client(classifier):
    with TestClient(build_app(Recording(classifier), max_texts=8, max_chars=50, api_key=KEY), headers={"X-API-Key": KEY}) as c:
        yield c


def as_dicts(predictions) -> list[dict]:
    return [p.to_dict() for p in predictions]


def same_predictions(got: list[dict], expected: list[dict]) -> bool:
    """Labels equal, scores equal to float noise (a batch pads differently than a single text)."""
    def rounded(rows):
        return [{**r, "score": pytest.approx(r["score"], abs=1e-4),
                 "top_k": [{**t, "score": pytest.approx(t["score"], abs=1e-4)} for t in r["top_k"]]} for r in rows]
    return got == rounded(expected)


def test_predictions_equal_the_library(client, classifier, texts):
    response = client.post("/v1/classify", json={"texts": texts[:8], "top_k": 3})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "default"
    assert same_predictions(response.json()["predictions"], as_dicts(classifier.predict(texts[:8], top_k=3)))


def test_each_adapter_answers_with_its_own_labels(client, classifier, texts):
    models = client.get("/v1/models").json()["models"]
    assert {m["name"]: m["labels"] for m in models} == {"default": classifier.labels(), "three": classifier.labels("three")}
    assert set(classifier.labels("three")) == set(THREE_LABELS) and len(classifier.labels()) == 5
    for model in ("three", "default"):
        response = client.post("/v1/classify", json={"texts": texts[:5], "model": model, "top_k": 3})
        assert response.status_code == 200, response.text
        assert same_predictions(response.json()["predictions"], as_dicts(classifier.predict(texts[:5], top_k=3, model=model)))
    three = client.post("/v1/classify", json={"texts": texts[:5], "model": "three", "top_k": 3}).json()["predictions"]
    assert all({t["label"] for t in p["top_k"]} == set(THREE_LABELS) for p in three)


@pytest.mark.parametrize(("body", "status", "detail"), [
    ({"texts": ["查余额"] * 9}, 413, "9 texts in one request; the limit is 8"),
    ({"texts": ["查余额", "长" * 51]}, 413, "texts[1] has 51 characters; the limit is 50"),
    ({"texts": ["长" * 5000]}, 413, "request body over 8960 bytes"),
    ({"texts": ["查余额", " "]}, 422, "texts[1] is empty"),
    ({"texts": []}, 422, "at least 1 item"),
    ({"text": "查余额"}, 422, "Field required"),
    ({"texts": ["查余额"], "model": "nope"}, 404, "unknown model 'nope'; available: default, three"),
    ({"texts": ["查余额"], "top_k": 0}, 422, "greater than or equal to 1"),
    ({"texts": ["查余额"], "model": "three", "top_k": 4}, 422, "top_k=4, but model 'three' has 3 labels"),
])
def test_bad_requests_get_a_clear_4xx(client, body, status, detail):
    response = client.post("/v1/classify", json=body)
    assert response.status_code == status
    assert detail in str(response.json()["detail"])


def test_malformed_json_is_422(client):
    response = client.post("/v1/classify", content=b'{"texts": [', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "JSON decode error" in str(response.json()["detail"])


def test_api_key_guards_everything_but_healthz(client):
    assert client.get("/healthz", headers={"X-API-Key": ""}).json() == {"status": "ok"}
    for route in ("/docs", "/openapi.json"):
        assert client.get(route, headers={"X-API-Key": ""}).status_code == 401
        assert client.get(route).status_code == 200  # X-API-Key from the client fixture
    assert "/v1/classify" in client.get("/openapi.json").json()["paths"]
    for headers in ({"X-API-Key": ""}, {"X-API-Key": "wrong"}, {"X-API-Key": "", "Authorization": "Bearer wrong"}):
        for response in (client.get("/v1/models", headers=headers), client.post("/v1/classify", json={"texts": ["查余额"]}, headers=headers)):
            assert response.status_code == 401 and "API key" in response.json()["detail"]
    assert client.get("/v1/models", headers={"X-API-Key": "", "Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/v1/models").status_code == 200  # X-API-Key from the client fixture


def test_a_model_error_is_a_500_with_an_id_and_the_service_keeps_going(client, caplog):
    with caplog.at_level(logging.ERROR, logger="intentlora.serve"):
        response = client.post("/v1/classify", json={"texts": ["查余额", "boom"]})
    assert response.status_code == 500
    detail = response.json()["detail"]
    assert "secret" not in detail and "RuntimeError" not in detail, "internal details must stay in the log"
    error_id = re.search(r"error id ([0-9a-f]{12})", detail).group(1)
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and "the model broke at /secret/path" in str(logged[0].exc_info[1])
    assert client.post("/v1/classify", json={"texts": ["查余额"]}).status_code == 200


def test_a_body_without_content_type_is_taken_as_json(client):
    body = json.dumps({"texts": ["查余额"]}).encode()
    for request in (client.build_request("POST", "/v1/classify", content=body), client.build_request("POST", "/v1/classify", content=body, headers={"Content-Type": ""})):
        request.headers.pop("Content-Type", None) if request.headers.get("Content-Type") else None
        assert not request.headers.get("Content-Type")
        response = client.send(request)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] in client.get("/v1/models").json()["models"][0]["labels"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_says_it_is_not_json_gets_415_saying_what_to_send(client, content_type):
    response = client.post("/v1/classify", content=b'{"texts": ["x"]}', headers={"Content-Type": content_type})
    assert response.status_code == 415 and "Content-Type: application/json" in response.json()["detail"]


@contextmanager
def running_server(app):
    """A real uvicorn server on a free port, in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP, so asyncio sets TCP_NODELAY: no 40 ms delayed ACKs
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


async def one_client(base_url: str, model: str, requests: list[list[str]]) -> list[tuple[str, list[str], httpx.Response]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        return [(model, texts, await http.post("/v1/classify", json={"texts": texts, "model": model, "top_k": 2})) for texts in requests]


async def many_clients(base_url: str, plans: list[tuple[str, list[list[str]]]]):
    return await asyncio.gather(*(one_client(base_url, model, requests) for model, requests in plans))


def test_a_failing_request_does_not_fail_the_others_in_its_batch(classifier):
    recording = Recording(classifier)
    bodies = [{"texts": ["查余额"]}, {"texts": ["boom"]}, {"texts": ["我的卡丢了"]}]

    async def send_together(base_url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/classify", json=body) for body in bodies))

    with running_server(build_app(recording, max_wait_ms=1000)) as base_url:
        responses = asyncio.run(send_together(base_url))
    assert recording.batch_sizes[0] == 3, "the three requests should have shared one batch"
    assert [r.status_code for r in responses] == [200, 500, 200]


def test_50_clients_x_20_requests_on_a_real_server(classifier, texts):
    """Every response holds its own request's predictions, from its own adapter, and concurrent requests share batches."""
    recording = Recording(classifier)
    # Client c asks one of the two models; its request r holds 1 to 3 texts, starting at a different place for each.
    plans = [("three" if c % 2 else "default", [texts[(c * 20 + r) % 100 : (c * 20 + r) % 100 + 1 + (c + r) % 3] for r in range(20)])
             for c in range(50)]
    expected = {model: dict(zip(texts, as_dicts(classifier.predict(texts, top_k=2, model=model)))) for model in ("default", "three")}
    with running_server(build_app(recording, max_batch_size=32, max_wait_ms=5)) as base_url:
        results = asyncio.run(many_clients(base_url, plans))
    responses = [row for client_results in results for row in client_results]
    assert len(responses) == 1000
    assert [r.status_code for _, _, r in responses] == [200] * 1000
    for model, sent, response in responses:
        assert response.json()["model"] == model
        assert same_predictions(response.json()["predictions"], [expected[model][t] for t in sent])
    assert max(recording.batch_sizes) > 3, "concurrent requests were never batched together"
    assert max(recording.batch_sizes) < 32 + 3


def test_a_full_queue_answers_503_with_retry_after_at_once(classifier):
    """The worker is stuck on one request; 2 more texts fill the queue (max_queue=2); the next is refused at once."""
    recording = Recording(classifier)
    recording.gate.clear()

    async def scenario(base_url: str):
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            running = asyncio.create_task(http.post("/v1/classify", json={"texts": ["查余额"]}))
            while not recording.batch_sizes:  # the first request is in the worker
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(http.post("/v1/classify", json={"texts": ["查余额", "我的卡丢了"]}))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            refused = await http.post("/v1/classify", json={"texts": ["转账"]})
            refused_after = time.monotonic() - started
            recording.gate.set()
            return await running, await queued, refused, refused_after

    with running_server(build_app(recording, max_queue=2, max_wait_ms=0)) as base_url:
        running, queued, refused, refused_after = asyncio.run(scenario(base_url))
    assert refused.status_code == 503 and "queue is full" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1 and refused_after < 5
    assert running.status_code == 200 and queued.status_code == 200  # the queued request was not lost
    assert len(queued.json()["predictions"]) == 2


def test_a_request_past_its_timeout_gets_503_and_never_runs(classifier):
    recording = Recording(classifier)
    recording.gate.clear()

    async def scenario(base_url: str):
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            running = asyncio.create_task(http.post("/v1/classify", json={"texts": ["查余额"]}))
            while not recording.batch_sizes:
                await asyncio.sleep(0.01)
            waiting = await http.post("/v1/classify", json={"texts": ["我的卡丢了", "转账"]})  # stuck behind the first
            recording.gate.set()
            return waiting, await running

    with running_server(build_app(recording, timeout_s=0.3, max_wait_ms=0)) as base_url:
        waiting, running = asyncio.run(scenario(base_url))
        assert waiting.status_code == 503 and "no answer within 0.3 s" in waiting.json()["detail"]
        assert "Retry-After" in waiting.headers
        assert running.status_code == 503  # the stuck one timed out too
        assert httpx.post(f"{base_url}/v1/classify", json={"texts": ["查余额"]}).status_code == 200
    assert 2 not in recording.batch_sizes, "the timed-out request must not be run after its client gave up"


def test_cli_serve_builds_the_service(monkeypatch, tiny_run, tiny_run_3labels):
    started = {}
    monkeypatch.setattr("intentlora.serve.run", lambda classifier, **options: started.update(options, models=classifier.models))
    args = ["serve", "--model", str(tiny_run), "--adapter", f"three={tiny_run_3labels}", "--port", "9000", "--max-texts", "10"]
    result = CliRunner().invoke(cli, args, env={"INTENTLORA_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert started["models"] == ["default", "three"]
    assert started["port"] == 9000 and started["host"] == "127.0.0.1" and started["api_key"] == KEY and started["max_texts"] == 10


@pytest.mark.parametrize(("adapter", "message"), [("three", "--adapter expects NAME=RUN_DIR, got 'three'"), ("=x", "got '=x'")])
def test_cli_serve_refuses_bad_adapters(tiny_run, adapter, message):
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_run), "--adapter", adapter])
    assert result.exit_code == EXIT_INPUT and message in result.output and "Traceback" not in result.output


def test_cli_serve_refuses_a_missing_model(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path / "nope")])
    assert result.exit_code == EXIT_INPUT and "nope" in result.output and "Traceback" not in result.output
