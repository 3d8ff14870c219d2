"""The HTTP service: a thin FastAPI adapter over a `Predictor`.

    POST /v1/predict   images (multipart field `image`, repeatable; JSON {"images": [base64, ...]};
                       or one raw image body) -> `vitkit predict --json` entries
    GET  /v1/model     name, classes, input, the run's test top-1, versions
    GET  /healthz      health, counters and the start-up warm-up (answers only once it is done)
    GET  /             the page (one static HTML file, no external assets)

Every client error is a 4xx whose body is one line of JSON: {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import platform
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import fastapi
import torch
import torchvision
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from vitkit.core.version import __version__
from vitkit.serve.predictor import Busy, Decoded, Predictor, RequestError

IMAGE_FIELDS = ("image", "images")  # multipart field names
JSON_FIELDS = ("images", "top_k", "attention")
HOW = "send images as multipart field 'image' or JSON {\"images\": [base64, ...]}"


def create_app(predictor: Predictor, *, max_bytes: int = 10 * 2**20) -> FastAPI:
    """The service for `predictor`, which it starts (warm-up included) and closes with the app. Bodies
    over `max_bytes` get 413."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # uvicorn listens only once this returns: nothing, /healthz included, is answered before the warm-up ends
        await run_in_threadpool(predictor.start)
        yield
        await run_in_threadpool(predictor.close)

    app = FastAPI(title="vitkit serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.predictor = predictor

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, err: RequestError) -> JSONResponse:
        return _error(err.status, str(err))

    @app.exception_handler(Busy)
    async def _busy(request: Request, err: Busy) -> JSONResponse:
        return _error(503, str(err), {"Retry-After": str(err.retry_after)})

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        return _error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        body = {
            "status": "ok" if predictor.alive else "stopped",
            "queued_images": predictor.pending,
            **predictor.stats,
            "warmup": predictor.warmup,
        }
        return JSONResponse(body, status_code=200 if predictor.alive else 503)

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return describe(predictor)

    @app.post("/v1/predict")
    async def predict(request: Request, top_k: int = 5, attention: bool = False) -> JSONResponse:
        unknown = sorted(set(request.query_params) - {"top_k", "attention"})
        if unknown:
            raise RequestError(f"unknown query parameter {unknown[0]!r}: the parameters are top_k and attention")
        body = await _read_body(request, max_bytes)
        images, top_k, attention = await _parse(request, body, predictor, top_k, attention)
        future = predictor.submit(images, top_k=top_k, attention=attention)
        return JSONResponse(await asyncio.wrap_future(future))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("vitkit.serve").joinpath("static/index.html").read_text())

    return app


def describe(predictor: Predictor) -> dict[str, Any]:
    """What `GET /v1/model` answers."""
    served, spec = predictor.served, predictor.served.spec
    return {
        "name": served.name,
        "classes": served.classes,
        "num_classes": predictor.num_classes,
        "input": spec.as_dict(),
        "test_top1": served.test_top1,
        "tta": served.tta,
        "attention": served.attention,
        "source": served.source,
        "device": str(predictor.device),
        "batching": {
            "max_batch": predictor.max_batch,
            "max_wait_ms": predictor.max_wait_ms,
            "max_queue": predictor.max_queue,
            "buckets": predictor.buckets,
            "batch_sizes": list(predictor.batch_sizes),
            "decode_threads": predictor.decode_threads,
        },
        "versions": {
            "vitkit": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "fastapi": fastapi.__version__,
            "uvicorn": uvicorn.__version__,
            "python": platform.python_version(),
        },
    }


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing (413) one over `max_bytes` before reading it when its length is declared."""
    declared = request.headers.get("content-length")
    too_big = f"the body is over --max-bytes {max_bytes}: send fewer or smaller images"
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(too_big, 413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:  # chunked bodies declare no length
            raise RequestError(too_big, 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise RequestError(f"empty body: {HOW}", 400)
    return body


async def _parse(
    request: Request, body: bytes, predictor: Predictor, top_k: int, attention: bool
) -> tuple[list[Decoded], int, bool]:
    """(decoded images, top_k, attention) from a multipart, JSON or raw-image body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        files = await _multipart(request, body, predictor.max_batch)
    elif kind == "application/json":
        files, top_k, attention = _json(body, top_k, attention)
    elif kind.startswith("image/") or kind == "application/octet-stream":
        files = [("body", body)]
    else:
        raise RequestError(f"unsupported content type {kind or 'none'!r}: {HOW}", 415)
    if len(files) > predictor.max_batch:
        raise RequestError(
            f"{len(files)} images in one request, over --max-batch {predictor.max_batch}: split the request", 413
        )
    images = await asyncio.wrap_future(predictor.decode_files(files))
    return images, top_k, attention


async def _multipart(request: Request, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files + 1, max_fields=16)
    except HTTPException as err:  # malformed multipart, too many parts
        raise RequestError(f"cannot read the multipart body ({err.detail}): {HOW}", 400) from None
    files = []
    for key, value in form.multi_items():
        if key not in IMAGE_FIELDS:
            raise RequestError(f"unknown field {key!r}: {HOW} (top_k and attention go in the query string)")
        if not isinstance(value, UploadFile):
            raise RequestError(f"field {key!r} holds text, not a file: {HOW}")
        files.append((value.filename or key, await value.read()))
    await form.close()
    if not files:
        raise RequestError(f"no image in the multipart body: {HOW}", 400)
    return files


def _json(body: bytes, top_k: int, attention: bool) -> tuple[list[tuple[str, bytes]], int, bool]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the body is not valid JSON ({err}): {HOW}", 400) from None
    if not isinstance(data, dict):
        raise RequestError(f"the JSON body must be an object: {HOW}")
    unknown = sorted(set(data) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: the JSON fields are {', '.join(JSON_FIELDS)}")
    images = data.get("images")
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise RequestError(f"field 'images' must be a list of base64 strings: {HOW}")
    if not images:
        raise RequestError(f"field 'images' is empty: {HOW}", 400)
    top_k = data.get("top_k", top_k)
    attention = data.get("attention", attention)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not isinstance(attention, bool):
        raise RequestError("field 'top_k' must be an integer and 'attention' true or false")
    files = []
    for i, text in enumerate(images):
        payload = text.split(",", 1)[1] if text.startswith("data:") else text  # data URLs too
        try:
            files.append((f"images[{i}]", base64.b64decode(payload, validate=True)))
        except (binascii.Error, ValueError):
            raise RequestError(f"images[{i}] is not valid base64: encode the image file's bytes") from None
    return files, top_k, attention
