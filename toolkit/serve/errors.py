"""Every refusal of the server as OpenAI's error body, `{"error": {message, type, param, code}}`, with a 4xx
status that the official client turns into its typed exceptions (BadRequestError, NotFoundError, ...)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class RequestError(Exception):
    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        kind = TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def error_response(message: str, param: str | None, status: int, code: str | None = None) -> JSONResponse:
    err = RequestError(message, param, status, code)
    return JSONResponse(err.body(), status_code=status)


TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")  # pydantic names a union's member too


def field_name(location: tuple) -> str:
    """FastAPI's error location ("body", "messages", 0, "role") as the field: messages[0].role."""
    name = ""
    for part in location[1:] if location and location[0] == "body" else location:
        if isinstance(part, str) and (part in TYPE_TAGS or "[" in part):
            break
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


async def on_request_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestError)
    return JSONResponse(err.body(), status_code=err.status)


async def on_validation_error(request: Request, err: Exception) -> JSONResponse:
    """Malformed JSON or a field of the wrong type: 400 naming the first field at fault."""
    assert isinstance(err, RequestValidationError)
    first = err.errors()[0]
    if first.get("type") == "json_invalid" or isinstance(first.get("input"), bytes | str):
        return error_response(f"the body is not valid JSON: {first.get('msg')}", "body", 400, "invalid_json")
    param = field_name(tuple(first.get("loc", ())))
    return error_response(f"{param}: {first.get('msg')}", param, 400)


async def on_http_error(request: Request, err: Exception) -> JSONResponse:
    """LitServe's own refusals (401 from authorize, 413 over the payload limit, 504 on a queue timeout)."""
    assert isinstance(err, HTTPException)
    return error_response(str(err.detail), None, err.status_code, None)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestError, on_request_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
