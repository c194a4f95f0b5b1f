"""The FastAPI app: routes, authentication, body-size limit, metrics and lifecycle.

    app = create_app({"dbrx": lm, "sd": image_pipeline}, api_key="sk-...", slots=8)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Models are LanguageModels (served by an Engine with `slots` KV-cache rows) or ImagePipelines, told apart by
duck typing (`generate`/`logits` vs `encode_prompt`).

Readiness: with warmup (the default) each engine compiles its programs in its thread; /health answers 503
{"status": "warming_up"} until every engine is done (requests sent meanwhile wait in the queue), then 200.
Drain: `app.state.draining = True` (mosaicjax.serve sets it on SIGTERM) makes /health and every new generation
request answer 503 while in-flight requests, streams included, finish; uvicorn stops accepting connections and
ends the lifespan when they are done, which stops the engines.
"""
from __future__ import annotations

import contextlib
import hmac
import os
import time
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from mosaicjax.serving import errors
from mosaicjax.serving import metrics as metrics_lib
from mosaicjax.serving import protocol
from mosaicjax.serving.engine import Engine
from mosaicjax.serving.errors import APIError, bad_request
from mosaicjax.serving.image_service import ImageService
from mosaicjax.serving.lm_service import LMService

API_KEY_ENV = "MOSAICJAX_API_KEY"


def is_image_model(model: Any) -> bool:
    return hasattr(model, "encode_prompt") and not hasattr(model, "logits")


class _LimitsMiddleware:
    """Pure-ASGI: 413 for bodies over max_body_bytes (declared or streamed), and request/status counting."""

    def __init__(self, app, max_body_bytes: int, metrics: metrics_lib.Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        path = scope.get("path", "")

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        length = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    length = -1
        if length is not None and (length < 0 or length > self.max_body_bytes):
            code = 413 if length > 0 else 400
            msg = (f"request body of {length} bytes exceeds the limit of {self.max_body_bytes}" if code == 413
                   else "invalid Content-Length")
            resp = JSONResponse(errors.error_body(code, msg), status_code=code)
            self.metrics.errors.labels(status=str(code)).inc()
            self.metrics.requests.labels(endpoint=path, status=str(code)).inc()
            return await resp(scope, receive, send_wrapper)
        seen = {"n": 0}

        async def receive_wrapper():
            message = await receive()
            if message["type"] == "http.request":
                seen["n"] += len(message.get("body", b""))
                if seen["n"] > self.max_body_bytes:
                    raise APIError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
            return message

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            known = path if path.startswith(("/v1/", "/health", "/metrics", "/tokeniz", "/detokeniz")) else "other"
            self.metrics.requests.labels(endpoint=known, status=str(status["code"])).inc()


def create_app(models: dict[str, Any], *, api_key: Optional[str] = None, slots: int = 8, queue_size: int = 256,
               max_body_bytes: int = 4 << 20, max_image_size: int = 1280, steps_per_sync: int = 1,
               image_queue_size: int = 64, image_max_batch: int = 8, default_image_steps: int = 30,
               warmup: bool = True, max_prefill_tokens: int = 4096) -> FastAPI:
    """The OpenAI-compatible app serving `models` ({name: LanguageModel | ImagePipeline}).

    api_key: when set (or $MOSAICJAX_API_KEY), every endpoint but /health needs `Authorization: Bearer KEY`.
    slots / queue_size / steps_per_sync: per-LM Engine settings. max_body_bytes: larger bodies get 413.
    max_image_size: the largest side a custom image size may have (the named sizes are always allowed).
    warmup: compile every LM program before /health reports ready (see the module docstring).
    max_prefill_tokens: padded prompt tokens per prefill call (Engine).
    """
    if not models:
        raise ValueError("create_app needs at least one model")
    api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    metrics = metrics_lib.Metrics()
    lms: dict[str, LMService] = {}
    images: dict[str, ImageService] = {}
    created = int(time.time())

    def start():
        for name, m in models.items():
            if is_image_model(m):
                images[name] = ImageService(name, m, max_image_size=max_image_size, max_batch=image_max_batch,
                                            queue_size=image_queue_size, default_steps=default_image_steps,
                                            metrics=metrics)
            else:
                engine = Engine(m, slots=slots, queue_size=queue_size, steps_per_sync=steps_per_sync,
                                metrics=metrics, model_name=name, warmup=warmup,
                                max_prefill_tokens=max_prefill_tokens)
                lms[name] = LMService(name, m, engine, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI):
        app_.state.draining = False
        yield
        app_.state.draining = True
        for s in lms.values():  # in-flight HTTP requests are done (uvicorn waited); stop the threads
            s.engine.shutdown(timeout=30)

    app = FastAPI(title="mosaicjax OpenAI-compatible server", lifespan=lifespan)
    app.state.metrics, app.state.lm_services, app.state.image_services = metrics, lms, images
    app.state.draining = False
    errors.install(app, metrics)
    start()

    async def auth(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided." if header else "Missing API key (Authorization: "
                           "Bearer KEY).", code="invalid_api_key")

    def lm_for(name: Optional[str], param: str = "model") -> LMService:
        if name is None:
            if len(lms) == 1:
                return next(iter(lms.values()))
            raise bad_request("model is required", param=param)
        if name in lms:
            return lms[name]
        if name in images:
            raise bad_request(f"model {name!r} is an image model; use /v1/images/generations", param=param)
        raise APIError(404, f"The model {name!r} does not exist.", param=param, code="model_not_found")

    def image_for(name: Optional[str]) -> ImageService:
        if name is None:
            if len(images) == 1:
                return next(iter(images.values()))
            raise bad_request("model is required", param="model")
        if name in images:
            return images[name]
        if name in lms:
            raise bad_request(f"model {name!r} is a language model, not an image model", param="model")
        raise APIError(404, f"The model {name!r} does not exist.", param="model", code="model_not_found")

    async def not_draining():
        if app.state.draining:
            raise APIError(503, "The server is shutting down; retry on another replica.", code="shutting_down")

    deps = [Depends(auth)]
    gen_deps = [Depends(auth), Depends(not_draining)]

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        warming = [n for n, s in lms.items() if not s.engine.ready.is_set()]
        if warming:
            return JSONResponse({"status": "warming_up", "models": warming}, status_code=503)
        return {"status": "ok", "models": list(models)}

    @app.get("/metrics", dependencies=deps)
    async def metrics_endpoint():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models", dependencies=deps)
    async def list_models():
        from openai.types import Model  # pylint: disable=import-outside-toplevel
        data = [Model(id=n, object="model", created=created, owned_by="mosaicjax").model_dump(mode="json")
                for n in models]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}", dependencies=deps)
    async def get_model(name: str):
        from openai.types import Model  # pylint: disable=import-outside-toplevel
        if name not in models:
            raise APIError(404, f"The model {name!r} does not exist.", param="model", code="model_not_found")
        return Model(id=name, object="model", created=created, owned_by="mosaicjax").model_dump(mode="json")

    @app.post("/v1/chat/completions", dependencies=gen_deps)
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        return await lm_for(body.model).chat(body, request)

    @app.post("/v1/completions", dependencies=gen_deps)
    async def completions(body: protocol.CompletionRequest, request: Request):
        return await lm_for(body.model).completions(body, request)

    @app.post("/v1/images/generations", dependencies=gen_deps)
    async def image_generations(body: protocol.ImageGenerationRequest):
        return await image_for(body.model).generate(body)

    @app.post("/tokenize", dependencies=deps)
    async def tokenize(body: protocol.TokenizeRequest):
        return lm_for(body.model).tokenize(body)

    @app.post("/detokenize", dependencies=deps)
    async def detokenize(body: protocol.DetokenizeRequest):
        return lm_for(body.model).detokenize(body)

    @app.get("/tokenizer_info", dependencies=deps)
    async def tokenizer_info_get(model: Optional[str] = None):
        return lm_for(model).tokenizer_info()

    @app.post("/tokenizer_info", dependencies=deps)
    async def tokenizer_info_post(body: protocol.TokenizerInfoRequest):
        return lm_for(body.model).tokenizer_info()

    app.add_middleware(_LimitsMiddleware, max_body_bytes=max_body_bytes, metrics=metrics)
    return app
