"""Request fields and their bounds (pydantic ``Annotated``), shared by both endpoints.

A value outside its bounds, of the wrong type or missing makes BentoML answer HTTP 400 with the
field's name in ``detail[].loc``; bounds that depend on the loaded variant (sizes) are checked by
the service, which answers 400 in the same shape.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from serving.config import from_env

_cfg = from_env()

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=_cfg.max_prompt_chars)]
NegativePrompt = Annotated[str, StringConstraints(max_length=_cfg.max_prompt_chars)]
Steps = Annotated[int, Field(ge=1, le=100)]
Guidance = Annotated[float, Field(ge=0.0, le=30.0)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Side = Annotated[int, Field(ge=8, le=4096)]
NumImages = Annotated[int, Field(ge=1, le=_cfg.max_images)]
ResponseFormat = Literal["b64_json"]

# ASCII digits only ("６４" is a digit to \d) and at most 5 of them: int() of thousands of digits raises
_SIZE_RE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})", re.ASCII)


def field_error(field: str, msg: str, value=None) -> dict:
    """A 400 body shaped like BentoML's own validation errors, so clients parse one format."""
    return {"error": f"1 validation error: {field}: {msg}",
            "detail": [{"type": "value_error", "loc": [field], "msg": msg, "input": value}]}


def parse_size(size: str) -> tuple[int, int] | None:
    """"WIDTHxHEIGHT" -> (width, height), or None when malformed."""
    m = _SIZE_RE.fullmatch(size.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None
