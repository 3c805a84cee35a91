"""The one place that turns errors into HTTP answers: the OpenAI error shape, or Anthropic's on the
Messages API paths (same status codes and headers either way)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..dialects import anthropic_messages
from ..errors import InvalidRequest, NotFound, RequestTooLarge, TokensForgeError
from .common import REQUEST_ID, STREAM, json_response, new_request_id
from .messages import anthropic_path

log = logging.getLogger("tokensforge.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: TokensForgeError, request_id: str, *, anthropic: bool = False) -> web.Response:
    headers = {"x-request-id": request_id, **error.headers}
    if error.final:
        headers["x-should-retry"] = "false"
    body = error.body()
    if anthropic:
        shaped = anthropic_messages.error_body(error.status, error.message)
        shaped["error"].update({k: v for k, v in body["error"].items() if k not in ("type", "message")})
        body = shaped
    return json_response(body, status=error.status, headers=headers)


def _from_http(exc: web.HTTPException) -> TokensForgeError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return RequestTooLarge("the request body is too large")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such endpoint")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        err = InvalidRequest(f"method {exc.method} is not allowed here")
        err.status = 405
        return err
    err = InvalidRequest(exc.reason or "bad request")
    err.status = exc.status
    return err


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = new_request_id()  # never the client's: ids key money rows
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except Exception as exc:
        started: web.StreamResponse | None = request.get(STREAM)
        if started is not None:  # the answer is already on its way: it cannot become an error response
            log.error("error after %s %s started streaming", request.method, request.path, exc_info=exc)
            return started
        return _error_answer(request, request_id, exc)
    if not response.prepared:
        response.headers["x-request-id"] = request_id
    return response


def _error_answer(request: web.Request, request_id: str, exc: Exception) -> web.StreamResponse:
    anthropic = anthropic_path(request.path)
    if isinstance(exc, TokensForgeError):
        return error_response(exc, request_id, anthropic=anthropic)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return error_response(_from_http(exc), request_id, anthropic=anthropic)
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(TokensForgeError("internal error"), request_id, anthropic=anthropic)
