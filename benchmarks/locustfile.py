"""Locust load for `intentlora serve`: each user posts one bundled test text per request, with no pause.

    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:8000

Set INTENTLORA_API_KEY when the server requires a key.
"""

from __future__ import annotations

import json
import os
import random

from locust import HttpUser, constant, task

from intentlora.config import BUNDLED_DATA

TEXTS = [json.loads(line)["text"] for line in (BUNDLED_DATA / "test.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


class ClassifyUser(HttpUser):
    wait_time = constant(0)  # closed loop: the next request leaves as soon as the answer arrives

    def on_start(self) -> None:
        if key := os.environ.get("INTENTLORA_API_KEY"):
            self.client.headers["Authorization"] = f"Bearer {key}"

    @task
    def classify(self) -> None:
        self.client.post("/v1/classify", json={"texts": [random.choice(TEXTS)]}, name="/v1/classify")
