"""HTTP service for a trained classifier: FastAPI routes, request limits, an API key, micro-batching.

Concurrent requests for the same model are combined into one `predict` call,
run on a single worker thread: the event loop never blocks on torch, and one
forward pass over 32 short texts costs far less than 32 passes over one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
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
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher:
    """Queues requests per (model, top_k) and runs each batch as one `predict` call on one thread.

    A batch closes when it holds `max_batch_size` texts or `max_wait_ms` after
    its first request; a request is never split, so a batch can exceed the size
    by less than one request. One batch never mixes models (adapters).
    """

    def __init__(self, classifier: IntentClassifier, max_batch_size: int, max_wait_ms: float) -> None:
        self.classifier = classifier
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intentlora-predict")
        self.queues: dict[tuple[str, int], asyncio.Queue[_Job]] = {}
        self.collectors: list[asyncio.Task] = []

    async def predict(self, texts: list[str], model: str, top_k: int) -> list[Prediction]:
        key = (model, top_k)
        if key not in self.queues:
            self.queues[key] = asyncio.Queue()
            self.collectors.append(asyncio.create_task(self._serve_queue(key)))
        job = _Job(texts)
        self.queues[key].put_nowait(job)
        return await job.future

    async def _serve_queue(self, key: tuple[str, int]) -> None:
        while True:
            jobs = await self._collect(self.queues[key])
            await self._run_batch(jobs, *key)

    async def _collect(self, queue: asyncio.Queue[_Job]) -> list[_Job]:
        jobs = [await queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while sum(len(job.texts) for job in jobs) < self.max_batch_size:
            try:
                async with asyncio.timeout_at(deadline):
                    jobs.append(await queue.get())
            except TimeoutError:
                break
        return jobs

    async def _run_batch(self, jobs: list[_Job], model: str, top_k: int) -> None:
        texts = [text for job in jobs for text in job.texts]
        loop = asyncio.get_running_loop()
        try:
            predictions = await loop.run_in_executor(self.worker, lambda: self.classifier.predict(texts, top_k=top_k, model=model))
        except Exception as error:  # a model error fails requests, never the service
            if len(jobs) > 1:  # run each request alone, so only the one that breaks the model fails
                for job in jobs:
                    await self._run_batch([job], model, top_k)
                return
            log.exception("prediction failed for %d texts on model %r", len(texts), model)
            if not jobs[0].future.done():
                jobs[0].future.set_exception(error)
            return
        start = 0
        for job in jobs:
            if not job.future.done():  # the client may have gone away
                job.future.set_result(predictions[start : start + len(job.texts)])
            start += len(job.texts)

    async def close(self) -> None:
        for task in self.collectors:
            task.cancel()
        await asyncio.gather(*self.collectors, return_exceptions=True)
        self.worker.shutdown(wait=True)


class BodySizeLimit:
    """ASGI middleware: refuse a body over `max_bytes` (413) as it streams in, before JSON parsing holds it all."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
                return await response(scope, receive, send)
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
    max_batch_size: int = 32,
    max_wait_ms: float = 5,
    max_texts: int = 64,
    max_chars: int = 2000,
    api_key: str | None = None,
) -> FastAPI:
    """The service: POST /v1/classify, GET /v1/models, GET /healthz, docs at /docs.

    The key guards every route but /healthz, the docs included (a load
    balancer's health probe carries no key).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = MicroBatcher(classifier, max_batch_size, max_wait_ms)
        yield
        await app.state.batcher.close()

    app = FastAPI(title="intentlora", summary="Intent classification with LoRA-tuned language models.", lifespan=lifespan,
                  docs_url=None, openapi_url=None)  # added below, behind the key
    # Room for max_texts texts of max_chars characters, even when JSON escapes each one as \ud83d\ude00 (12 bytes).
    app.add_middleware(BodySizeLimit, max_bytes=max_texts * (max_chars * 12 + 8) + 4096)
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

    @app.post("/v1/classify", dependencies=authorized, response_model=ClassifyResponse)
    async def classify(body: ClassifyRequest, request: Request) -> dict:
        check_request(body, classifier, max_texts, max_chars)
        try:
            predictions = await request.app.state.batcher.predict(body.texts, body.model, body.top_k)
        except Exception as error:
            raise HTTPException(500, f"prediction failed: {type(error).__name__}: {error}") from error
        return {"model": body.model, "predictions": [p.to_dict() for p in predictions]}

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
    """Serve until interrupted; `options` go to `build_app`. One process: the model is loaded once."""
    import uvicorn

    uvicorn.run(build_app(classifier, **options), host=host, port=port)
