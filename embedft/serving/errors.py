"""Serving errors: ServeError at start (the CLI prints it on one line), RequestError per request
(the app answers it in OpenAI's error shape with its HTTP status)."""

from __future__ import annotations

from embedft.errors import ModelError


class ServeError(ModelError):
    """A model or adapter cannot be served; the message says why and what to pass instead."""


class RequestError(ServeError):
    """One request cannot be answered; the server goes on serving the others."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class BadRequest(RequestError):
    status = 400


class NotFound(RequestError):
    status = 404
    type = "not_found_error"


class Conflict(RequestError):
    status = 409


class TooLarge(RequestError):
    status = 413


class Overloaded(RequestError):
    """The queue is full (or the server is stopping): retry after Retry-After seconds."""

    status = 503
    type = "server_overloaded"


class EngineFailure(RequestError):
    """The forward pass itself failed (a bug or out of memory); the rows of that batch fail, the server goes on."""

    status = 500
    type = "server_error"
