"""OpenAI's error envelope and the mapping of every client mistake to a 4xx.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

The SDK retries 5xx and 429 responses, so a malformed request must never look like a server fault: request
validation errors, malformed JSON, wrong content types and too-large bodies are 400/413/415; only a genuine bug
is a 500 (and is logged with its traceback).
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered in OpenAI's envelope; raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error" if status < 500
                                                            else "server_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _loc_to_param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # Drop pydantic's union-member tags ("str", "list[int]") so the param names the request field.
    parts = [p for p in parts if not (p.startswith(("list[", "function-")) or p in ("str", "int"))]
    return ".".join(parts) or None


def install(app: FastAPI, metrics=None) -> None:
    """Registers the handlers that turn every failure into the envelope."""

    def respond(exc: APIError, request: Request):
        if metrics is not None:
            metrics.errors.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = _loc_to_param(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            msg, param = f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
        else:
            msg = "; ".join(f"{_loc_to_param(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errs[:5])
        return respond(APIError(400, msg, param=param), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return respond(APIError(status, message, headers=getattr(exc, "headers", None)), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return respond(APIError(500, f"internal server error: {type(exc).__name__}"), request)
