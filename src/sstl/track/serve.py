"""`sstl serve`'s HTTP server: a registered model behind MLflow's scoring protocol, with limits.

    python -m sstl.track.serve --model models:/sstl@champion --host 127.0.0.1 --port 5001

POST /invocations takes what MLflow's scoring server takes for this model (`{"dataframe_split":
{"columns": ["image"], "data": [["<base64>"], ...]}}`, or `dataframe_records` / `instances` /
`inputs` as lists of {"image": ...}) and answers `{"predictions": [{class, probability,
probabilities}, ...]}`; GET /ping and /health say it is up. Unlike MLflow's server it is safe to leave
running on a laptop:

- a body over `serve.max_body_mb` is refused (413) before it is read whole, an image over
  `serve.max_pixels` before it is decoded (a 164 KB PNG can unpack to 13,000 x 13,000 px), and a
  request holds at most `serve.max_images`;
- only `application/json` is taken (415): an HTML form or `text/csv` cannot be posted cross-site
  without a preflight, and a request whose Origin is another site, or whose Host is not this server
  (DNS rebinding) on a loopback bind, is refused (403). On a bind to another address (`--host
  0.0.0.0`) any Host is taken, so DNS rebinding is not stopped there: put such a server behind a
  proxy that checks it;
- only JPEG, PNG, BMP and WebP are opened (no other image plugin of Pillow runs on a request);
- images are scored in chunks, and a request whose client has gone stops at the next chunk;
- every error is one line of JSON, `{"error_code": ..., "message": ...}`, never a stack trace.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sstl.config.serve import ServeConfig
from sstl.core.errors import SstlError
from sstl.data.images import UnreadableImage, decode
from sstl.models.inference import infer
from sstl.runtime.device import CPU
from sstl.track.registry import ImageClassifier, load, probability_table

FORMATS = ("JPEG", "PNG", "BMP", "WEBP")  # what prepare reads; no other Pillow plugin (EPS runs Ghostscript)
CHUNK = 16  # images decoded and scored at a time: between two chunks a gone client stops the work
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class Refused(Exception):
    """A request answered with `status` and one line; nothing of the server's insides in it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Gone(Exception):
    """The client closed the connection: its request is dropped, not finished."""


def create_app(model: ImageClassifier, cfg: ServeConfig, *, host: str, port: int) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    hosts = _allowed_hosts(host, port)

    @app.exception_handler(Refused)
    async def refused(_: Request, err: Refused) -> JSONResponse:
        return JSONResponse({"error_code": err.code, "message": err.message}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:  # 404, 405: the same one line
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(err.status_code, "BAD_REQUEST")
        return JSONResponse({"error_code": code, "message": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(Gone)
    async def gone(_: Request, __: Gone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:  # one line, no stack trace, no paths
        return JSONResponse(
            {"error_code": "INTERNAL_ERROR", "message": f"the server failed on this request ({type(err).__name__})"},
            status_code=500,
        )

    @app.get("/ping")
    @app.get("/health")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("\n")

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        _check_origin(request, hosts)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Refused(415, "UNSUPPORTED_MEDIA_TYPE", f"send application/json, not {kind or 'no content type'}")
        images = _images(await _body(request, cfg.max_body_mb), cfg.max_images)
        probs = []
        for start in range(0, len(images), CHUNK):
            if await request.is_disconnected():
                raise Gone
            part = images[start : start + CHUNK]
            probs.append(await run_in_threadpool(_score, model, part, start, cfg.max_pixels))
        table = probability_table(torch.cat(probs), model.classes)
        return JSONResponse({"predictions": table.to_dict(orient="records")})

    return app


def _allowed_hosts(host: str, port: int) -> set[str] | None:
    """The Host headers a loopback bind answers (DNS rebinding: another name that resolves here is
    refused); None, any, for a server bound to be reached from elsewhere."""
    if host not in LOOPBACK:
        return None
    return {f"{name}:{port}" for name in LOOPBACK} | set(LOOPBACK)


def _check_origin(request: Request, hosts: set[str] | None) -> None:
    host = request.headers.get("host", "")
    if hosts is not None and host not in hosts:
        raise Refused(403, "FORBIDDEN", f"Host {host!r} is not this server: call it as http://127.0.0.1")
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != host:
        raise Refused(403, "FORBIDDEN", f"requests from {origin} are refused: call the server from this machine")


async def _body(request: Request, max_mb: float) -> Any:
    limit = int(max_mb * 2**20)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, "PAYLOAD_TOO_LARGE", f"the body is {int(declared) / 2**20:.1f} MB, over serve.max_body_mb")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise Refused(413, "PAYLOAD_TOO_LARGE", f"the body is over serve.max_body_mb ({max_mb:g} MB)")
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: JSON nested too deep
        raise Refused(400, "BAD_REQUEST", f"the body is not JSON ({type(err).__name__})") from None


def _images(payload: Any, max_images: int) -> list[Any]:
    """The `image` values of a scoring request, in order, in any of MLflow's JSON layouts."""
    values: Sequence[Any] | None = None
    if isinstance(payload, dict) and isinstance(payload.get("dataframe_split"), dict):
        split = payload["dataframe_split"]
        columns, data = split.get("columns"), split.get("data")
        if not isinstance(columns, list) or "image" not in columns or not isinstance(data, list):
            raise Refused(400, "BAD_REQUEST", 'dataframe_split needs "columns": ["image"] and "data": [[...], ...]')
        at = columns.index("image")
        if not all(isinstance(row, list) and len(row) > at for row in data):
            raise Refused(400, "BAD_REQUEST", "every dataframe_split row needs a value for each column")
        values = [row[at] for row in data]
    elif isinstance(payload, dict):
        records = next((payload[k] for k in ("dataframe_records", "instances", "inputs") if k in payload), None)
        if isinstance(records, list):
            values = [r.get("image") if isinstance(r, dict) else r for r in records]
    if values is None:
        raise Refused(400, "BAD_REQUEST", 'expected {"dataframe_split": {"columns": ["image"], "data": [[...]]}}')
    if not values:
        raise Refused(400, "BAD_REQUEST", "no image in the request: send at least one")
    if len(values) > max_images:
        raise Refused(413, "PAYLOAD_TOO_LARGE", f"{len(values)} images, over serve.max_images ({max_images})")
    return list(values)


def _score(model: ImageClassifier, values: list[Any], start: int, max_pixels: int) -> torch.Tensor:
    images = np.stack([_decode(model, value, start + i, max_pixels) for i, value in enumerate(values)])
    return infer(model.model, torch.from_numpy(images), tta=model.tta, desc="serve", runtime=CPU).softmax(1)


def _decode(model: ImageClassifier, value: Any, row: int, max_pixels: int) -> np.ndarray:
    if not isinstance(value, str):
        raise Refused(400, "BAD_REQUEST", f"image {row}: expected a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(400, "BAD_REQUEST", f"image {row}: not base64") from None
    try:  # the header only: how many pixels decoding would make
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        width = height = 0  # decode says what is wrong with it
    if width * height == 0:
        raise Refused(400, "BAD_REQUEST", f"image {row}: not a JPEG, PNG, BMP or WebP image")
    if width * height > max_pixels:
        raise Refused(
            413, "PAYLOAD_TOO_LARGE", f"image {row}: {width} x {height} px, over serve.max_pixels ({max_pixels})"
        )
    try:
        return decode(data, model.image_size, model.interpolation)
    except UnreadableImage as err:
        raise Refused(400, "BAD_REQUEST", f"image {row}: {err}") from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a registered sstl model over HTTP (see the module doc).")
    parser.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version>, runs:/...")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--config", default="{}", help="serve limits as JSON (params.yaml's serve section)")
    args = parser.parse_args(argv)
    try:
        cfg = ServeConfig.model_validate_json(args.config)
        model = load(args.model)
    except SstlError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))  # a closed terminal stops it as a kill does
    app = create_app(model, cfg, host=args.host, port=args.port)
    # limit_concurrency: at most that many requests at once (each under the body and pixel caps), the
    # rest answered 503 at once instead of queueing memory; no access log, one line per request is noise
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        limit_concurrency=cfg.max_concurrent,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
