"""The one place that turns errors into HTTP answers: the OpenAI error shape, or Anthropic's on the
Messages API paths (same status codes and headers either way)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from .. import tracing
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
        err.headers["allow"] = ", ".join(sorted(exc.allowed_methods))  # RFC 9110 §15.5.6: a 405 says what is
        return err
    err = InvalidRequest(exc.reason or "bad request")
    err.status = exc.status
    return err


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = new_request_id()  # never the client's: ids key money rows
    request[REQUEST_ID] = request_id
    if tracing.ON and request.path in tracing.PROXIED and request.method == "POST":
        return await _traced(request, handler, request_id)
    return await _answer(request, handler, request_id)


async def _answer(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
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


async def _traced(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    """`_answer` inside the request's server span (tracing on), which the request's Lifecycle fills in."""
    span = tracing.server_span(request.method, request.path, request.headers)
    token = tracing.REQUEST_SPAN.set(span)
    status: int | None = None
    try:
        response = await _answer(request, handler, request_id)
        status = response.status
        return response
    finally:
        tracing.REQUEST_SPAN.reset(token)
        span.set_attribute("tokensforge.request_id", request_id)
        tracing.end_server_span(span, status)


def _error_answer(request: web.Request, request_id: str, exc: Exception) -> web.StreamResponse:
    anthropic = anthropic_path(request.path)
    if isinstance(exc, TokensForgeError):
        return error_response(exc, request_id, anthropic=anthropic)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        if exc.status == 413:
            # the client's mistake, not ours: one line, no traceback; and the connection is closed after the
            # answer, so nothing of the unread rest of the body can ever be taken for a next request
            log.info("%s %s: request body over the size limit refused (413)", request.method, request.path)
            response = error_response(_from_http(exc), request_id, anthropic=anthropic)
            response.force_close()
            return response
        return error_response(_from_http(exc), request_id, anthropic=anthropic)
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(TokensForgeError("internal error"), request_id, anthropic=anthropic)
