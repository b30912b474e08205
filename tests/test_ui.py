"""The web UI (`intentlora ui`): its API with FastAPI's TestClient, then the pages in a real headless Chromium.

The API tests train nothing: a fake `train` command (a few lines of Python
printing the JSON log events) exercises the queue, the cancel and the
statuses. The browser test starts a real tiny-model training through the page.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from intentlora.cli import EXIT_USAGE, app as cli
from intentlora.config import load_config
from intentlora.predict import IntentClassifier, precision_curve
from intentlora.ui import build_app, machine_lock, parse_line
from tests.conftest import write_jsonl

KEY = "ui-s3cret"
CHROMIUM = os.environ.get("INTENTLORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# A stand-in for `intentlora train`: the events of --log-format json, then it
# waits for RUN.release (or a signal) before it writes metrics.json.
FAKE_TRAIN = r"""
import json, pathlib, sys, time
run = pathlib.Path(sys.argv[1])
run.mkdir(parents=True, exist_ok=True)
(run / "config.yaml").write_text("model:\n  name: fake\n")
print("a plain line, not JSON", flush=True)
print(json.dumps({"event": "phase", "phase": "training", "message": "go"}), flush=True)
for step in (1, 2):
    print(json.dumps({"event": "train_log", "step": step, "max_steps": 2, "loss": 1.0 / step}), flush=True)
print(json.dumps({"event": "progress", "bar": "train", "n": 2, "total": 2}), flush=True)
print(json.dumps({"event": "eval", "step": 2, "split": "valid", "macro_f1": 0.5}), flush=True)
while not (run.parent / (run.name + ".release")).exists():
    time.sleep(0.05)
(run / "metrics.json").write_text("{}")
print(json.dumps({"event": "result", "run_dir": str(run), "metrics": {"lora": {"macro_f1": 0.5}}}), flush=True)
"""


COMMANDS: list[list[str]] = []  # the `train` command lines the UI would have run


def fake_train(argv: list[str], run_dir: Path) -> list[str]:
    COMMANDS.append(argv)
    return [sys.executable, "-c", FAKE_TRAIN, str(run_dir)]


def wait_for(check, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def client(runs_dir, tmp_path):
    app = build_app(runs_dir, lock_path=tmp_path / "train.lock", train_command=fake_train)
    with TestClient(app) as c:
        yield c


def job_state(client, job_id: str) -> dict:
    return client.get(f"/api/jobs/{job_id}").json()


# ---------------------------------------------------------------- data checks


def test_validation_prints_what_the_validate_command_prints(client, tmp_path, bundled_rows):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(bundled_rows["train"][0], ensure_ascii=False) + "\n{not json\n" + '{"text": "", "label": "refund"}\n'
                     + json.dumps(bundled_rows["train"][0], ensure_ascii=False) + "\n", encoding="utf-8")
    test = write_jsonl(tmp_path / "test.jsonl", [bundled_rows["train"][0], bundled_rows["test"][0]])
    got = client.post("/api/validate", json={"train": str(train), "test": str(test)}).json()
    printed = CliRunner().invoke(cli, ["validate", "--all", str(train), str(test)])
    assert printed.exit_code == 1
    assert got["lines"] == printed.stdout.splitlines()
    assert got["lines"][0].startswith(f"{train}:2: ")  # FILE:LINE, as the CLI says it
    assert (got["errors"], got["warnings"]) == (2, 2)  # bad JSON, empty text; a duplicate, a test text seen in train
    assert got["summary"] in printed.stderr
    only = client.post("/api/validate", json={"train": str(test), "labels": ["refund"]}).json()  # --labels: others are errors
    printed = CliRunner().invoke(cli, ["validate", "--all", str(test), "--labels", "refund"])
    assert only["lines"] == printed.stdout.splitlines() and "unknown label" in printed.stdout


def upload(client, filename: str, data: bytes):
    return client.post("/api/upload", json={"filename": filename, "content_base64": base64.b64encode(data).decode()})


def test_upload_keeps_each_distinct_file(client, runs_dir, bundled_rows):
    content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bundled_rows["train"][:10]).encode()
    first = upload(client, "mine.jsonl", content).json()
    assert Path(first["path"]).read_bytes() == content and first["errors"] == 0
    assert first["summary"].startswith("10 valid rows in 1 file(s)")
    again = upload(client, "mine.jsonl", content).json()
    other = upload(client, "mine.jsonl", content[: content.index(b"\n") + 1]).json()
    assert again["path"] == first["path"] and Path(other["path"]).name == "mine-2.jsonl"
    assert first["path"] in client.get("/api/info").json()["files"]
    for bad in ("model.bin", ".hidden.jsonl"):
        assert upload(client, bad, content).status_code == 422, bad
    escaped = upload(client, "../escape.jsonl", content).json()
    assert Path(escaped["path"]) == runs_dir / ".ui" / "uploads" / "escape.jsonl"  # the name only, never a path


def test_an_uploaded_file_is_checked_byte_for_byte(client):
    latin1 = '{"text": "caf\xe9", "label": "a"}\n'.encode("latin-1")  # not UTF-8 on line 2
    got = upload(client, "latin1.jsonl", b'{"text": "ok", "label": "a"}\n' + latin1).json()
    printed = CliRunner().invoke(cli, ["validate", "--all", got["path"]])
    assert got["lines"] == printed.stdout.splitlines()
    assert got["lines"][0].startswith(f"{got['path']}:2: ") and got["errors"] == 1


def test_start_refuses_bad_data_names_and_options(client, runs_dir, small_data, tmp_path):
    train, test = small_data
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi"}\n', encoding="utf-8")
    response = client.post("/api/jobs", json={"train": str(bad), "test": str(test)})
    assert response.status_code == 422
    assert response.json()["detail"]["problems"][0]["message"].startswith(f"{bad}:1: ")
    for request, status in [({"name": "../out"}, 422), ({"precision": "fp8"}, 422), ({"baselines": ["bert"]}, 422), ({"epochs": 0}, 422), ({"lora_targets": []}, 422)]:
        assert client.post("/api/jobs", json={"train": str(train), "test": str(test), **request}).status_code == status, request
    (runs_dir / "taken").mkdir()
    response = client.post("/api/jobs", json={"train": str(train), "test": str(test), "name": "taken"})
    assert response.status_code == 409 and "choose another run name" in response.json()["detail"]
    assert client.get("/api/jobs").json() == []


# ---------------------------------------------------------------- the queue


def test_one_training_at_a_time_queue_and_cancel(client, runs_dir, small_data):
    train, test = (str(p) for p in small_data)
    start = lambda name: client.post("/api/jobs", json={"train": train, "test": test, "name": name}).json()  # noqa: E731
    a = client.post("/api/jobs", json={"train": train, "test": test, "name": "a", "model": "my/model", "epochs": 2, "lr": 1e-3,
                                       "lora_r": 8, "lora_targets": ["q_proj", "v_proj"], "baselines": ["tfidf"], "precision": "fp32"}).json()
    argv = COMMANDS[-1]
    pairs = {argv[i]: argv[i + 1] for i in range(4, len(argv) - 1, 2)}
    assert argv[1:4] == ["-m", "intentlora.cli", "train"] and argv[-2:] == ["--log-format", "json"]
    assert {k: pairs[k] for k in ("--model", "--epochs", "--lr", "--precision", "--output")} == {
        "--model": "my/model", "--epochs": "2.0", "--lr": "0.001", "--precision": "fp32", "--output": str(runs_dir.resolve() / "a")}
    assert {"lora.r=8", "lora.alpha=16", "lora.target_modules=[q_proj,v_proj]", "eval.baselines=[tfidf]"} <= set(argv[i + 1] for i, x in enumerate(argv) if x == "--set")
    b = start("b")
    wait_for(lambda: job_state(client, a["id"])["state"] == "running", what="a to run")
    assert {k: job_state(client, b["id"])[k] for k in ("state", "position", "ahead")} == {"state": "queued", "position": 1, "ahead": 1}
    assert client.post("/api/jobs", json={"train": train, "test": test, "name": "b"}).status_code == 409
    status = lambda: {r["name"]: r["status"] for r in client.get("/api/runs").json()}  # noqa: E731
    wait_for(lambda: status().get("a") == "running", what="a listed as running")

    assert client.post(f"/api/jobs/{b['id']}/cancel").json()["state"] == "cancelled"  # queued: leaves the queue
    c = start("c")
    assert client.post(f"/api/jobs/{a['id']}/cancel").json()["state"] == "cancelled"  # running: SIGTERM
    wait_for(lambda: job_state(client, a["id"])["returncode"] is not None, what="a to stop")
    assert job_state(client, a["id"])["returncode"] < 0  # ended by the signal, not by itself
    wait_for(lambda: job_state(client, c["id"])["state"] == "running", what="c to start after a")
    assert not (runs_dir / "b").exists()  # a cancelled queued job never started
    assert status()["a"] == "unfinished"

    wait_for(lambda: status().get("c") == "running", what="c listed as running")
    assert client.post("/api/runs/c/resume").status_code == 409  # running
    resumed = client.post("/api/runs/a/resume").json()  # cancelled: unfinished, so it can be continued
    assert COMMANDS[-1][3:] == ["train", "--config", str(runs_dir.resolve() / "a" / "config.yaml"),
                                "--output", str(runs_dir.resolve() / "a"), "--resume", "--log-format", "json"]
    assert resumed["state"] == "queued" and client.post("/api/runs/a/resume").status_code == 409  # queued
    client.post(f"/api/jobs/{resumed['id']}/cancel")

    (runs_dir / "c.release").touch()
    wait_for(lambda: job_state(client, c["id"])["state"] == "finished", what="c to finish")
    done = job_state(client, c["id"])
    events = done["events"]
    assert [e["event"] for e in events] == ["log", "phase", "train_log", "train_log", "eval", "result"]
    assert events[0]["message"] == "a plain line, not JSON" and [e["loss"] for e in events[2:4]] == [1.0, 0.5]
    assert done["progress"]["train"]["n"] == 2 and done["lora_macro_f1"] == 0.5 and done["phase"] == "training"
    assert client.get(f"/api/jobs/{c['id']}?since=4").json()["events"] == events[4:]
    assert status() == {"a": "unfinished", "c": "finished"}


def test_a_training_waits_while_another_ui_holds_the_machine(client, runs_dir, small_data, tmp_path):
    train, test = (str(p) for p in small_data)
    with machine_lock(tmp_path / "train.lock", lambda: False, lambda: None):
        job = client.post("/api/jobs", json={"train": train, "test": test, "name": "later"}).json()
        wait_for(lambda: any(e["event"] == "waiting" for e in job_state(client, job["id"])["events"]), what="the waiting note")
        assert job_state(client, job["id"])["state"] == "queued" and not (runs_dir / "later").exists()
    wait_for(lambda: job_state(client, job["id"])["state"] == "running", what="the start once the lock is free")
    client.post(f"/api/jobs/{job['id']}/cancel")


def test_a_crashed_training_is_reported_and_the_ui_goes_on(runs_dir, small_data, tmp_path):
    crash = 'import json, sys; print(json.dumps({"event": "error", "message": "out of memory"})); sys.exit(1)'
    app = build_app(runs_dir, lock_path=tmp_path / "train.lock", train_command=lambda argv, run_dir: [sys.executable, "-c", crash])
    train, test = (str(p) for p in small_data)
    with TestClient(app) as client:
        job = client.post("/api/jobs", json={"train": train, "test": test, "name": "crash"}).json()
        wait_for(lambda: job_state(client, job["id"])["state"] == "failed", what="the failure")
        done = job_state(client, job["id"])
        assert done["returncode"] == 1 and done["events"] == [{"event": "error", "message": "out of memory"}]
        assert client.get("/api/runs").status_code == 200


def test_output_lines_become_events():
    assert parse_line('{"event": "eval", "macro_f1": 0.5}\n') == {"event": "eval", "macro_f1": 0.5}
    assert parse_line(" 10%|#   | 1/10\r 50%|#####  | 5/10\n") == {"event": "log", "message": "50%|#####  | 5/10"}
    assert parse_line('["json", "but no event"]') == {"event": "log", "message": '["json", "but no event"]'}
    assert parse_line("  \n") is None


# ---------------------------------------------------------------- runs, compare, try


@pytest.fixture
def two_runs(runs_dir, tiny_run, tiny_run_3labels) -> Path:
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "five").symlink_to(tiny_run, target_is_directory=True)
    (runs_dir / "three").symlink_to(tiny_run_3labels, target_is_directory=True)
    return runs_dir


def test_runs_listing_and_compare(client, two_runs, tiny_run, tiny_run_3labels):
    (two_runs / "broken").mkdir()
    (two_runs / "broken" / "config.yaml").write_text("model:\n  name: x\n")
    rows = {r["name"]: r for r in client.get("/api/runs").json()}
    assert {n: r["status"] for n, r in rows.items()} == {"five": "finished", "three": "finished", "broken": "unfinished"}
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert rows["five"]["lora_macro_f1"] == metrics["lora"]["macro_f1"] and rows["five"]["labels"] == metrics["labels"]
    assert rows["five"]["n_train"] == metrics["data"]["train"] and rows["three"]["labels"] == json.loads((tiny_run_3labels / "labels.json").read_text())

    result = client.post("/api/compare", json={"runs": ["five", "three"]}).json()
    assert [r["name"] for r in result["runs"]] == ["five", "three"]
    assert result["runs"][0]["metrics"]["lora"]["macro_f1"] == metrics["lora"]["macro_f1"]
    assert set(result["runs"][1]["per_class_f1"]) == set(rows["three"]["labels"])
    diff = {d["key"]: d["values"] for d in result["config_diff"]}
    assert diff["data.train"] == [str(tiny_run.parent / "train.jsonl"), str(tiny_run_3labels.parent / "train.jsonl")]
    assert "model.name" not in diff and "output.dir" not in diff  # the same base; the folder always differs

    assert client.post("/api/compare", json={"runs": ["five"]}).status_code == 422
    assert client.post("/api/compare", json={"runs": ["five", "broken"]}).status_code == 409
    assert client.get("/api/runs/five/files/report.html").text == (tiny_run / "report.html").read_text(encoding="utf-8")
    assert client.get("/api/runs/five/files/adapter").status_code == 404  # only the files the page shows
    assert client.get("/api/runs/..%2F..%2Fetc/files/config.yaml").status_code in (404, 422)


def test_try_applies_the_threshold_and_scores_the_test_set(client, two_runs, tiny_run, bundled_rows):
    texts = [r["text"] for r in bundled_rows["test"][:3]]
    expected = IntentClassifier.from_pretrained(tiny_run).predict(texts, top_k=2)
    got = client.post("/api/try", json={"run": "five", "texts": texts, "top_k": 2, "threshold": 0}).json()
    for p, e in zip(got["predictions"], expected):
        assert p["label"] == e.label and p["score"] == pytest.approx(e.score, abs=1e-5) and not p["fallback"]
        assert [k["label"] for k in p["top_k"]] == [k["label"] for k in e.top_k]
    cut = (expected[0].score + expected[1].score) / 2  # between two texts' scores: one keeps its label, the other falls back
    got = client.post("/api/try", json={"run": "five", "texts": texts[:2], "threshold": cut}).json()
    assert [p["fallback"] for p in got["predictions"]] == [e.score < cut for e in expected[:2]]
    assert {p["label"] for p in got["predictions"] if p["fallback"]} <= {"other"}
    three = client.post("/api/try", json={"run": "three", "texts": texts[:1], "threshold": 0.9})  # no 'other' label and none given
    assert three.status_code == 200 and three.json()["fallback_label"] == "other"
    assert client.post("/api/try", json={"run": "five", "texts": ["  "]}).status_code == 422

    curve = client.get("/api/runs/five/curve").json()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert curve["n"] == metrics["data"]["test"] == len(curve["points"])
    everything = max(curve["cuts"], key=lambda c: c["coverage"])
    assert everything["coverage"] == 1 and everything["precision"] == pytest.approx(metrics["lora"]["accuracy"])
    assert curve["cuts"] == precision_curve([p[0] for p in curve["points"]], [p[1] for p in curve["points"]])


def test_api_key_when_given(runs_dir, tmp_path):
    with TestClient(build_app(runs_dir, api_key=KEY, lock_path=tmp_path / "lock")) as c:
        assert c.get("/").status_code == 200 and "intentlora" in c.get("/").text  # the page holds no data
        assert c.get("/static/app.js").status_code == 200
        assert c.get("/api/runs").status_code == 401
        assert c.get("/api/runs", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/api/runs", headers={"X-API-Key": KEY}).json() == []
        assert c.get("/api/info", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_cli_refuses_an_open_ui_without_a_key(tmp_path):
    result = CliRunner().invoke(cli, ["ui", "--host", "0.0.0.0", "--runs", str(tmp_path)], env={"INTENTLORA_API_KEY": ""})
    assert result.exit_code == EXIT_USAGE and "--api-key" in result.stderr


# ---------------------------------------------------------------- the pages in Chromium


@contextmanager
def running_server(app):
    """A real uvicorn server on a free port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 30, "the server")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright's launch options (--headed, --slowmo, ...) with the system Chromium, not Playwright's download."""
    headless = browser_type_launch_args.get("headless", True)
    return {**browser_type_launch_args, "executable_path": CHROMIUM,
            "args": [a for a in CHROMIUM_ARGS if a != "--headless" or headless]}


@pytest.fixture
def ui_page(request):
    """A page in Chromium. Playwright runs for this test only: its sync API holds an event loop that
    would break asyncio.run() in the tests after it."""
    pytest.importorskip("pytest_playwright", reason="Playwright is not installed: pip install -e '.[dev]'")
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set INTENTLORA_CHROMIUM)")
    launch_args = request.getfixturevalue("browser_type_launch_args")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(**launch_args)
        except Exception as error:  # noqa: BLE001 - any launch failure means: no browser here
            pytest.skip(f"Chromium at {CHROMIUM} did not start: {error}")
        yield browser.new_page(viewport={"width": 1360, "height": 900})
        browser.close()


def test_train_watch_list_and_try_in_the_browser(ui_page, tiny_qwen2, tiny_run, small_data, runs_dir, tmp_path, bundled_rows):
    page, (train, test) = ui_page, small_data
    runs_dir.mkdir(parents=True)
    (runs_dir / "earlier").symlink_to(tiny_run, target_is_directory=True)  # a second run to compare with
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "label": "refund"}\n{"text": "", "label": "refund"}\n', encoding="utf-8")
    app = build_app(runs_dir, lock_path=tmp_path / "train.lock")
    with running_server(app) as url:
        page.goto(url)
        page.set_input_files("#train-upload", str(bad))
        page.wait_for_selector("#validation .summary.bad")
        assert page.inner_text("#validation .problem.error").startswith(f"{runs_dir.resolve()}/.ui/uploads/bad.jsonl:2: ")
        page.set_input_files("#train-upload", str(train))
        page.wait_for_selector("#validation .summary.ok")
        assert "40 valid rows in 1 file(s), 0 error(s)" in page.inner_text("#validation .summary")
        assert page.input_value("#train-file").endswith("/.ui/uploads/train.jsonl")
        page.set_input_files("#test-upload", str(test))
        page.wait_for_function("document.querySelector('#validation .summary').textContent.includes('in 2 file(s)')")
        page.fill("#model", str(tiny_qwen2))
        page.fill("#run-name", "browser-run")
        page.fill("#epochs", "1")
        page.fill("#lr", "0.005")
        page.fill("#batch-size", "8")
        page.select_option("#precision", "fp32")
        for baseline in ("random_head", "zero_shot"):
            page.uncheck(f"#baselines input[value={baseline}]")
        page.click("#start")
        job = page.locator(".job", has_text="browser-run")
        job.locator(".badge.running, .badge.finished").wait_for(timeout=30_000)
        job.locator(".badge.finished").wait_for(timeout=90_000)
        assert "LoRA macro-F1" in job.inner_text()
        assert job.locator(".chart.loss path").count() >= 1  # the loss curve was drawn from the live events

        page.click("nav a[data-page=runs]")
        row = page.locator("#runs-table tr[data-run=browser-run]")
        row.wait_for()
        assert "finished" in row.inner_text() and "tfidf" in row.inner_text()
        metrics = json.loads((runs_dir / "browser-run" / "metrics.json").read_text())
        assert f"{metrics['lora']['macro_f1']:.3f}" in row.inner_text()
        page.check("#runs-table tr[data-run=earlier] .pick")
        row.locator(".pick").check()
        page.click("#compare")
        page.wait_for_selector("#compare-card:not([hidden]) table")
        compared = page.inner_text("#comparison")
        assert "browser-run" in compared and "earlier" in compared and "train.epochs" in compared  # 1 epoch vs 2
        row.locator("button[data-report]").click()
        page.wait_for_selector("#report-card:not([hidden])")
        assert "Baselines vs LoRA" in page.frame_locator("#report-frame").locator("body").inner_text()

        page.click("nav a[data-page=try]")
        page.wait_for_function("document.querySelector('#try-run').value === 'browser-run'")
        page.wait_for_selector("#curve-stats b")
        page.fill("#try-texts", bundled_rows["test"][0]["text"])
        page.click("#try-go")
        page.wait_for_selector(".prediction .bar")
        assert page.locator(".prediction .bar").count() == 3  # top-3 bars
        page.fill("#threshold", "1")
        page.dispatch_event("#threshold", "input")
        assert "fallback" in page.inner_text(".prediction .label")  # no score reaches 1.0
        assert "coverage 0.000" in page.inner_text("#curve-stats")
        page.fill("#threshold", "0.3")
        page.dispatch_event("#threshold", "input")
    run = runs_dir / "browser-run"  # an ordinary run folder, from the options picked on the page
    assert {"adapter", "config.yaml", "labels.json", "metrics.json", "report.html"} <= {p.name for p in run.iterdir()}
    cfg = load_config(run / "config.yaml")
    assert (cfg.model.name, cfg.train.epochs, cfg.train.batch_size, cfg.train.precision) == (str(tiny_qwen2), 1, 8, "fp32")
    assert cfg.eval.baselines == ["tfidf"] and cfg.data.train == str(runs_dir.resolve() / ".ui" / "uploads" / "train.jsonl")


def test_the_page_asks_for_the_key_once(ui_page, runs_dir, tmp_path):
    page = ui_page
    with running_server(build_app(runs_dir, api_key=KEY, lock_path=tmp_path / "train.lock")) as url:
        page.goto(url)
        page.wait_for_selector("#keybar:not([hidden])")
        page.fill("#key", "wrong")
        page.click("#key-save")
        page.wait_for_function("document.querySelector('#key-msg').textContent === 'wrong key'")
        page.fill("#key", KEY)
        page.click("#key-save")
        page.wait_for_function("document.querySelector('#runs-dir').textContent.startsWith('runs: ')")
        assert page.locator("#keybar").is_hidden()
        page.click("nav a[data-page=runs]")
        page.wait_for_selector("#runs-table td.muted")  # the empty table, fetched with the key
        assert "No runs" in page.inner_text("#runs-table")
