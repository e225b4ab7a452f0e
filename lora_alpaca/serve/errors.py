"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status,
            message,
            param,
            type,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_validation(exc) -> ApiError:
    """The first pydantic error, with its field path as OpenAI's `param`."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    # Union members add their type name to the path (e.g. stop.str); keep the field path.
    loc = [
        p
        for p in loc
        if p not in ("str", "list[str]", "int", "float", "bool", "list[ContentPart]", "ContentPart")
    ]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {err.get('msg', 'invalid value')}", param)
