"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, never a traceback."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 502: "server_error",
         503: "server_error"}


log = logging.getLogger("star_elastic.serve")


class RequestError(Exception):
    """An error reported to the client with `status`: 4xx for its input, 500 when generating its request
    failed, 502 when a proxy's backend did, 503 when the engine process is gone."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status)


async def on_request_error(request: Request, err: RequestError) -> JSONResponse:
    if err.status >= 500:  # the message names the request id where there is one
        log.error("%s %s: %d %s", request.method, request.url.path, err.status, err.message)
    return error_response(err.message, err.status, err.param, err.code)


async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    """pydantic's most specific complaint as one line naming the field (malformed JSON included): of a
    union's members, the one that got deepest into the value (a list of parts over "not a string")."""
    found = err.errors() or [{"loc": (), "msg": "invalid request"}]
    locs = [[str(p) for p in e.get("loc", ()) if p != "body" and not _union_tag(p)] for e in found]
    deepest = max(range(len(found)), key=lambda i: len(locs[i]))  # the first of the deepest
    first, param = found[deepest], ".".join(locs[deepest]) or None
    if first.get("type") == "json_invalid":
        return error_response(f"the body is not valid JSON ({first.get('msg')})", 400, None, "invalid_json")
    where = f"{param}: " if param else ""
    return error_response(f"{where}{first.get('msg')}", 400, param, first.get("type"))


def _union_tag(part) -> bool:
    """pydantic names the union member tried in `loc` ('float', 'list[str]', 'constrained-int'): not a field."""
    return isinstance(part, str) and (part in {"float", "int", "str", "bool", "list", "dict", "none"}
                                      or "[" in part or "-" in part)


async def on_http_error(request: Request, err: HTTPException) -> JSONResponse:
    return error_response(str(err.detail), err.status_code)


async def on_any_error(request: Request, err: Exception) -> JSONResponse:
    log.error("%s %s: internal error", request.method, request.url.path, exc_info=err)
    return error_response(f"internal error: {type(err).__name__}", 500)
