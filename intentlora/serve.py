"""HTTP service for a trained classifier: FastAPI routes, request limits, an API key, micro-batching.

Concurrent requests for the same model are combined into one batch, run on a
single worker thread: the event loop never blocks on torch, and one forward
pass over 32 short texts costs far less than 32 passes over one. The queue is
bounded: an overloaded service answers 503 with Retry-After rather than
letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from intentlora.predict import IntentClassifier, Prediction

log = logging.getLogger(__name__)


class ClassifyRequest(BaseModel):
    texts: list[str] = Field(min_length=1, description="Texts to classify, in one request.")
    model: str = Field("default", description="`default` or an adapter name; see GET /v1/models.")
    top_k: int = Field(1, ge=1, description="How many labels to return per text, best first.")


class LabelScore(BaseModel):
    label: str
    score: float


class PredictionOut(BaseModel):
    label: str = Field(description="The predicted label, or the fallback label when the score is under the threshold.")
    score: float
    top_k: list[LabelScore]
    fallback: bool


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[PredictionOut]


class ModelInfo(BaseModel):
    name: str
    labels: list[str]


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


@dataclass
class _Job:
    texts: list[str]
    top_k: int
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    taken: bool = False  # in a batch: no longer counted as queued


class Overloaded(Exception):
    """The queue is full, or a request waited past its timeout: answer 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class MicroBatcher:
    """Queues requests per model and runs what is waiting as one batch on one worker thread.

    When the worker is free, a batch takes every waiting request up to
    `max_batch_size` texts (and, when fewer wait, those that keep arriving
    less than `max_wait_ms` apart); `IntentClassifier.probabilities` then tokenizes them in one
    call, sorts them by length and cuts forward passes by texts and tokens,
    so a batch of mixed lengths pads little. A request is never split; one
    batch never mixes models (adapters) but does mix `top_k`. At most
    `max_queue` texts wait; past that `predict` raises Overloaded at once,
    and a request that waits longer than `timeout_s` is dropped with it.
    """

    def __init__(self, classifier: IntentClassifier, max_batch_size: int, max_wait_ms: float, max_queue: int = 256,
                 timeout_s: float = 30) -> None:
        self.classifier = classifier
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.queued = 0  # texts waiting, over every model
        self.texts_per_s = 0.0  # recent worker throughput, for Retry-After
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intentlora-predict")
        self.queues: dict[str, asyncio.Queue[_Job]] = {}
        self.collectors: list[asyncio.Task] = []

    async def predict(self, texts: list[str], model: str, top_k: int) -> list[Prediction]:
        if self.queued + len(texts) > self.max_queue:
            raise Overloaded(f"the queue is full ({self.queued} texts waiting, limit {self.max_queue}); retry later", self.retry_after())
        if model not in self.queues:
            self.queues[model] = asyncio.Queue()
            self.collectors.append(asyncio.create_task(self._serve_queue(model)))
        job = _Job(texts, top_k)
        self.queued += len(texts)
        self.queues[model].put_nowait(job)
        try:
            return await asyncio.wait_for(job.future, self.timeout_s)  # cancels the job on timeout: no batch will run it
        except TimeoutError:
            raise Overloaded(f"no answer within {self.timeout_s:g} s: the service is overloaded; retry later", self.retry_after()) from None
        finally:
            if not job.taken:
                job.taken = True
                self.queued -= len(texts)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, by the recent throughput (at least 1)."""
        return max(1, math.ceil(self.queued / self.texts_per_s)) if self.texts_per_s else 1

    async def _serve_queue(self, model: str) -> None:
        while True:
            jobs = await self._collect(self.queues[model])
            if jobs:
                await self._run_batch(jobs, model)

    async def _collect(self, queue: asyncio.Queue[_Job]) -> list[_Job]:
        """What is waiting, up to max_batch_size texts.

        When the queue runs dry it waits for more while requests keep coming:
        until no new one arrives for max_wait_ms (clients answered together
        send their next requests a moment apart, and splitting them would cost
        a second, smaller forward pass), and never past 10 x max_wait_ms in all.
        """
        jobs, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = None
        while size < self.max_batch_size:
            try:
                if queue.empty() and jobs:
                    deadline = deadline or loop.time() + 10 * self.max_wait_s
                    async with asyncio.timeout_at(min(deadline, loop.time() + self.max_wait_s)):
                        job = await queue.get()
                else:
                    job = await queue.get()
            except TimeoutError:
                break
            if job.future.done():  # timed out or its client went away while it waited
                continue
            job.taken = True
            self.queued -= len(job.texts)
            jobs.append(job)
            size += len(job.texts)
        return jobs

    async def _run_batch(self, jobs: list[_Job], model: str) -> None:
        texts = [text for job in jobs for text in job.texts]
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            probs = await loop.run_in_executor(self.worker, self.classifier.probabilities, texts, model)
        except Exception:  # a model error fails requests, never the service
            if len(jobs) > 1:  # run each request alone, so only the one that breaks the model fails
                for job in jobs:
                    await self._run_batch([job], model)
                return
            error_id = uuid.uuid4().hex[:12]
            log.exception("prediction failed (error id %s) for %d texts on model %r", error_id, len(texts), model)
            if not jobs[0].future.done():
                jobs[0].future.set_exception(PredictionFailed(error_id))
            return
        elapsed = max(loop.time() - start, 1e-6)
        self.texts_per_s = len(texts) / elapsed if not self.texts_per_s else 0.8 * self.texts_per_s + 0.2 * len(texts) / elapsed
        row = 0
        for job in jobs:
            if not job.future.done():  # the client may have gone away
                job.future.set_result(self.classifier.predictions(probs[row : row + len(job.texts)], job.top_k, model))
            row += len(job.texts)

    async def close(self) -> None:
        for task in self.collectors:
            task.cancel()
        await asyncio.gather(*self.collectors, return_exceptions=True)
        self.worker.shutdown(wait=True)


class PredictionFailed(Exception):
    """The model raised: the details go to the log under `error_id`, never to the client."""

    def __init__(self, error_id: str) -> None:
        super().__init__(error_id)
        self.error_id = error_id


class RequestGate:
    """ASGI middleware for bodies: 413 over `max_bytes` (as it streams in, before JSON parsing holds it all),
    415 for a body that says it is not JSON; a body with no Content-Type is taken as JSON."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if not content_type:  # curl --data-binary and many scripts send none: take the body for what the route expects
            others = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
            scope = {**scope, "headers": [*others, (b"content-type", b"application/json")]}
        elif not (content_type.endswith(b"/json") or content_type.endswith(b"+json")):
            detail = (f"Content-Type {content_type.decode('latin-1')!r} is not JSON: send the body as JSON with the header "
                      "'Content-Type: application/json' (curl: -H 'Content-Type: application/json')")
            return await JSONResponse({"detail": detail}, status_code=415)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
                return await response(scope, receive, send)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        replayed = False

        async def replay():  # the body once, then the real channel (for disconnects)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def api_key_checker(api_key: str | None):
    """A dependency that accepts `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time."""
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer), key: str | None = Depends(header)) -> None:
        if api_key is None:
            return
        given = [credentials.credentials if credentials else None, key]
        if not any(g is not None and secrets.compare_digest(g.encode(), api_key.encode()) for g in given):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def build_app(
    classifier: IntentClassifier,
    *,
    max_batch_size: int = 64,
    max_wait_ms: float = 2,
    max_texts: int = 64,
    max_chars: int = 2000,
    max_queue: int = 256,
    timeout_s: float = 30,
    api_key: str | None = None,
) -> FastAPI:
    """The service: POST /v1/classify, GET /v1/models, GET /healthz, docs at /docs.

    The key guards every route but /healthz, the docs included (a load
    balancer's health probe carries no key). Overload answers 503 with
    Retry-After (more than `max_queue` texts waiting, or no answer within
    `timeout_s`); a model error answers 500 with an id to find in the log.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = MicroBatcher(classifier, max_batch_size, max_wait_ms, max_queue, timeout_s)
        yield
        await app.state.batcher.close()

    app = FastAPI(title="intentlora", summary="Intent classification with LoRA-tuned language models.", lifespan=lifespan,
                  docs_url=None, openapi_url=None)  # added below, behind the key
    # Room for max_texts texts of max_chars characters, even when JSON escapes each one as \ud83d\ude00 (12 bytes).
    app.add_middleware(RequestGate, max_bytes=max_texts * (max_chars * 12 + 8) + 4096)
    authorized = [Depends(api_key_checker(api_key))]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/openapi.json", dependencies=authorized, include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.get("/docs", dependencies=authorized, include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="intentlora API")

    @app.get("/v1/models", dependencies=authorized)
    def models() -> ModelsResponse:
        return ModelsResponse(models=[ModelInfo(name=name, labels=classifier.labels(name)) for name in classifier.models])

    @app.post("/v1/classify", dependencies=authorized, response_model=ClassifyResponse,
              responses={503: {"description": "Overloaded: retry after the Retry-After header's seconds."},
                         500: {"description": "The model failed; the detail holds an id to find in the server log."}})
    async def classify(body: ClassifyRequest, request: Request) -> Response:
        check_request(body, classifier, max_texts, max_chars)
        try:
            predictions = await request.app.state.batcher.predict(body.texts, body.model, body.top_k)
        except Overloaded as error:
            raise HTTPException(503, str(error), headers={"Retry-After": str(error.retry_after_s)}) from None
        except PredictionFailed as error:
            raise HTTPException(500, f"prediction failed (error id {error.error_id}; the server log has the details)") from None
        # Built here, once: the response model documents it, re-validating it would only cost time.
        payload = {"model": body.model, "predictions": [p.to_dict() for p in predictions]}
        return Response(json.dumps(payload, ensure_ascii=False), media_type="application/json")

    return app


def check_request(body: ClassifyRequest, classifier: IntentClassifier, max_texts: int, max_chars: int) -> None:
    """Refuse what the model should never see: 404 unknown model, 413 too big, 422 empty text or bad top_k."""
    if body.model not in classifier.models:
        raise HTTPException(404, f"unknown model {body.model!r}; available: {', '.join(classifier.models)}")
    if len(body.texts) > max_texts:
        raise HTTPException(413, f"{len(body.texts)} texts in one request; the limit is {max_texts}")
    for i, text in enumerate(body.texts):
        if len(text) > max_chars:
            raise HTTPException(413, f"texts[{i}] has {len(text)} characters; the limit is {max_chars}")
        if not text.strip():
            raise HTTPException(422, f"texts[{i}] is empty or only whitespace")
    n_labels = len(classifier.labels(body.model))
    if body.top_k > n_labels:
        raise HTTPException(422, f"top_k={body.top_k}, but model {body.model!r} has {n_labels} labels")


def run(classifier: IntentClassifier, *, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve until interrupted; `options` go to `build_app`. One process: the model is loaded once.

    No access log: on a small CPU, formatting a line per request costs throughput the model needs.
    """
    import uvicorn

    uvicorn.run(build_app(classifier, **options), host=host, port=port, access_log=False)
