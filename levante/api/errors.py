"""Every failure leaves the server as OpenAI's error JSON with the right status: the client's
mistakes are 4xx naming the field, and nothing a client sends can produce a 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
        self.kind = kind or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# names pydantic puts in an error's location for the member of a union that failed
_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "ImagePart"})


def field_path(loc: tuple[Any, ...]) -> str:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'; ('query', 'seats') -> 'seats'."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and "[" not in part and part not in _UNION_MEMBERS:
            out += f".{part}" if out else part
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic complaint, phrased as OpenAI does: the field, then what is wrong."""
    errors = exc.errors()
    # a union (str | list) reports one failure per member; the most specific one names the problem
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
    loc = tuple(first.get("loc", ()))
    param = field_path(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param)
    if kind in ("json_invalid", "model_attributes_type") or not param:
        return bad_request(f"The request body is not a valid JSON object: {first.get('msg', '')}")
    return bad_request(f"Invalid value for '{param}': {first.get('msg', 'invalid')}", param)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: "Unknown endpoint", 405: "Method not allowed"}.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return APIError(500, f"internal error: {type(exc).__name__}").response()
