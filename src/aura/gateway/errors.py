"""From an error to its HTTP answer: one table, looked up by the error's class and then its
bases (a ``NotFoundError`` is an ``InvalidInputError``, and answers 404, not 422).

    error                                            status  code
    Unauthorized (no key, a wrong key)               401     unauthorized
    NotFoundError                                    404     not_found
    ConflictError                                    409     conflict
    BodyTooLarge                                     413     too_large
    UnsupportedMediaType (and its encodings)         415     unsupported_media_type
    InvalidInputError                                422     invalid_input, every field
    DatabaseTransactionError, ServiceUnavailable...  503     unavailable, Retry-After
    any other AuraError                              500     internal

Every body is ``{"error": {"code", "message", "fields"?}}`` (``schemas.ErrorBody``). A
routing error (404, 405, OPTIONS) and FastAPI's own validation answer in the same shape;
anything else is the ``ErrorGuard``'s 500.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from aura.errors import (
    AuraError,
    ConflictError,
    DatabaseTransactionError,
    InvalidInputError,
    NotFoundError,
    ServiceUnavailableError,
)
from aura.gateway.bodies import BodyTooLarge, UnsupportedMediaType
from aura.gateway.guard import RETRY_AFTER_SECONDS

__all__ = ["ANSWERS", "Answer", "Unauthorized", "error_response", "install_error_handlers"]

Fields = list[dict[str, str]]


class Unauthorized(AuraError):
    """The request's API key is missing or unknown."""


def _field(name: str) -> Callable[[Exception], Fields]:
    return lambda exc: [{"field": name, "message": str(exc)}]


def _own_field(exc: Exception) -> Fields:
    return [{"field": getattr(exc, "field", None) or "", "message": str(exc)}]


def _every_field(exc: Exception) -> Fields:
    return [{"field": f, "message": m} for f, m in getattr(exc, "errors", ())]


@dataclass(frozen=True)
class Answer:
    """What an error answers: a status, a code, its message (``None``: the error's own
    words) and the fields it names."""

    status: int
    code: str
    message: str | None = None
    fields: Callable[[Exception], Fields] | None = None
    retry_after: bool = False


_UNAVAILABLE = Answer(503, "unavailable", "a dependency is unavailable; retry later", None, True)
ANSWERS: dict[type[Exception], Answer] = {
    Unauthorized: Answer(401, "unauthorized", fields=_field("X-API-Key")),
    NotFoundError: Answer(404, "not_found"),
    ConflictError: Answer(409, "conflict", fields=_own_field),
    BodyTooLarge: Answer(413, "too_large", fields=_field("body")),
    UnsupportedMediaType: Answer(415, "unsupported_media_type", fields=_field("content-type")),
    InvalidInputError: Answer(422, "invalid_input", fields=_every_field),
    DatabaseTransactionError: _UNAVAILABLE,
    ServiceUnavailableError: _UNAVAILABLE,
    AuraError: Answer(500, "internal", "internal error"),
}


def error_response(
    status: int,
    code: str,
    message: str,
    fields: Fields | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _answer_for(exc: Exception) -> Answer:
    return next(ANSWERS[kind] for kind in type(exc).__mro__ if kind in ANSWERS)


async def _answer_error(_: Request, exc: Exception) -> Response:
    answer = _answer_for(exc)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if answer.retry_after else None
    return error_response(
        answer.status,
        answer.code,
        str(exc) if answer.message is None else answer.message,
        answer.fields(exc) if answer.fields else None,
        headers=headers,
    )


def _allowed_methods(routes: Iterable[Any], path: str) -> set[str]:
    """Every method some route serves at ``path`` (Starlette names only the first route's),
    in the app's routes and its routers' (FastAPI keeps an included router whole)."""
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, APIRoute | Route) and route.path_regex.match(path):
            methods |= route.methods or set()
        elif (included := getattr(route, "original_router", None)) is not None:
            methods |= _allowed_methods(included.routes, path)
    return methods


async def _routing_error(request: Request, exc: Exception) -> Response:
    """Routing errors in our format; OPTIONS and 405 list every method of the path."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code not in (404, 405):
        return error_response(exc.status_code, "http_error", str(exc.detail))
    allowed = _allowed_methods(request.app.routes, request.url.path)
    if not allowed:
        return error_response(404, "not_found", f"no such resource: {request.url.path[:200]}")
    allow = {"Allow": ", ".join(sorted(allowed | {"OPTIONS"}))}
    if request.method == "OPTIONS":
        return Response(status_code=204, headers=allow)
    message = f"{request.method} is not allowed here; allowed: {allow['Allow']}"
    return error_response(405, "method_not_allowed", message, headers=allow)


async def _invalid_request(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    fields = [
        {"field": ".".join(str(p) for p in e["loc"][1:]) or "request", "message": e["msg"]}
        for e in exc.errors()
    ]
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return error_response(422, "invalid_input", f"invalid request: {summary}", fields)


def install_error_handlers(app: FastAPI) -> None:
    """One handler for every error of the table (Starlette picks the closest class), and
    the routing and validation errors in the same body."""
    for kind in ANSWERS:
        app.add_exception_handler(kind, _answer_error)
    app.add_exception_handler(StarletteHTTPException, _routing_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
