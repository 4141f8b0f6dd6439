"""The JSON body parser: strict JSON the rest of the gateway can rely on. A body Python's json module would take but
nothing downstream can (``1e400`` read as infinity, a lone UTF-16 surrogate, nesting thousands deep) is refused here,
as the client's error, before any of it is hashed, stored or sent to a provider."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from rest_framework.parsers import JSONParser

from openopen8.core.errors import InvalidRequest

MAX_DEPTH = 32  # OpenAI's image requests nest three levels at most


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequest(f"The JSON body holds the number {text[:40]}, which is out of range.")
    return value


def _constant(text: str) -> Any:
    raise InvalidRequest(f"The JSON body holds {text}, which is not JSON.")


def _check_tree(data: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings that are not Unicode text (lone surrogates), walking the
    tree without recursion."""
    stack = [(data, 1, None)]
    while stack:
        value, depth, top = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"The JSON body nests deeper than {MAX_DEPTH} levels.", param=top)
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, top)  # a bad key is not named: it cannot be rendered either
                stack.append((item, depth + 1, top or key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, top) for item in value)
        elif isinstance(value, str):
            _check_text(value, top)


SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(text: str, param: str | None) -> None:
    # Searched, not encoded: a 50 MB data URL must not be copied to be checked.
    if not text.isascii() and SURROGATE.search(text):
        raise InvalidRequest(f"Invalid '{param}': the text holds a lone UTF-16 surrogate, which is not Unicode."
                             if param else "The JSON body holds a lone UTF-16 surrogate, which is not Unicode.",
                             param=param)


class StrictJSONParser(JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        raw = stream.read() if stream is not None else b""
        try:
            data = json.loads(raw, parse_float=_finite, parse_constant=_constant)
        except RecursionError:
            raise InvalidRequest(f"The JSON body nests deeper than {MAX_DEPTH} levels.") from None
        except ValueError as error:  # not JSON, or not UTF-8
            raise InvalidRequest("We could not parse the JSON body of your request. The OpenAI API expects a JSON "
                                 "payload; check that it is valid JSON and that Content-Type is application/json. "
                                 f"({type(error).__name__}: {str(error)[:200]})") from None
        _check_tree(data)
        return data
