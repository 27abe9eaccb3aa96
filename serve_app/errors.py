"""Errors as OpenAI shapes them: meteora's typed request errors mapped to HTTP statuses, and the handlers that answer
every error an app raises."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from meteora_moe import RequestError
from meteora_moe.errors import Busy, InvalidRequest, PromptTooLong, UnknownExpert

log = logging.getLogger("meteora_moe.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# meteora's typed request errors -> HTTP status and OpenAI error type
STATUS = {InvalidRequest: (400, "invalid_request_error"), UnknownExpert: (404, "invalid_request_error"),
          PromptTooLong: (413, "invalid_request_error"), Busy: (429, "rate_limit_error")}


def api_error(error: RequestError) -> APIError:
    status, kind = next((STATUS[c] for c in type(error).__mro__ if c in STATUS), STATUS[InvalidRequest])
    return APIError(status, error.message, error.param, error.code, kind)


def add_error_handlers(app: FastAPI) -> None:
    """Every error an app raises, answered in OpenAI's error shape: bad input a 4xx (never a 5xx), our own failure
    a 500 server_error."""

    @app.exception_handler(APIError)
    async def http_api_error(_: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError):
        return api_error(error).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, "malformed JSON body", None, "json_invalid").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]  # e.g. ["prompt", "str"]: field, then union member
        return APIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", loc[0] if loc else None, first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail), None, None).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception):
        log.exception("internal error")
        return APIError(500, f"internal error: {type(error).__name__}", None, None, "server_error").response()
