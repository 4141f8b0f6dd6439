"""Request checks driven by the model rules table (``model_rules.json``, extendable by the operator).

The table is data: adding a model or changing a limit is an edit of JSON, not of this code. A model with no rule
gets the basic checks only; fields the gateway does not know are forwarded untouched.
"""

from __future__ import annotations

import fnmatch
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from django.conf import settings

from openopen8.core.errors import InvalidRequest
from openopen8.core.schemas import ImageRequest, JSONDict

BUILTIN_RULES = Path(__file__).with_name("model_rules.json")


@lru_cache(maxsize=1)
def load_table() -> JSONDict:
    """The built-in table with the operator's file (OPENOPEN8_MODEL_RULES_FILE) merged over its models."""
    table: JSONDict = json.loads(BUILTIN_RULES.read_text())
    if settings.OPENOPEN8_MODEL_RULES_FILE:
        extra = json.loads(Path(settings.OPENOPEN8_MODEL_RULES_FILE).read_text())
        extra_models = extra.get("models", {})
        # The operator's entries come first, so their patterns win over the built-in ones.
        table["models"] = extra_models | {k: v for k, v in table["models"].items() if k not in extra_models}
    return table


def rule_for(model: str) -> JSONDict | None:
    """The rule for a model name: an exact entry first, then the first matching pattern; ``like`` is followed."""
    models = load_table()["models"]
    rule = models.get(model)
    if rule is None:
        patterns = (r for pattern, r in models.items() if "*" in pattern and fnmatch.fnmatchcase(model, pattern))
        rule = next(patterns, None)
    while rule is not None and "like" in rule:
        rule = models[rule["like"]]
    return rule


def _bad(message: str, param: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _check_int(body: JSONDict, name: str, low: int, high: int | None) -> None:
    value = body[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"Invalid type for '{name}': expected an integer, but got {type(value).__name__}.", name,
                   "invalid_type")
    if value < low:
        raise _bad(f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got {value}.",
                   name, "integer_below_min_value")
    if high is not None and value > high:
        raise _bad(f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got {value}.",
                   name, "integer_above_max_value")


def _check_choice(value: Any, name: str, allowed: list[str], model: str) -> None:
    if value not in allowed:
        raise _bad(f"Invalid value for '{name}': {value!r}. Supported values for {model} are: "
                   f"{', '.join(repr(a) for a in allowed)}.", name)


def _check_field(body: JSONDict, name: str, spec: Any, model: str) -> None:
    value = body[name]
    if isinstance(spec, list):
        _check_choice(value, name, spec, model)
    elif "min" in spec:
        _check_int(body, name, spec["min"], spec.get("max"))
    elif spec.get("type") == "object" and not isinstance(value, dict):
        raise _bad(f"Invalid type for '{name}': expected an object.", name, "invalid_type")


def _check_size(size: str, rule: JSONDict, model: str) -> None:
    if size in rule["sizes"]:
        return
    custom = rule.get("custom_sizes")
    width, _, height = size.partition("x")
    if custom and width.isdecimal() and height.isdecimal() and int(width) > 0 and int(height) > 0:
        w, h = int(width), int(height)
        if (w % custom["multiple"] == 0 and h % custom["multiple"] == 0 and max(w, h) <= custom["max_edge"]
                and max(w, h) <= custom["max_ratio"] * min(w, h) and w * h <= custom["max_pixels"]):
            return
        raise _bad(f"Invalid size '{size}' for {model}: both sides must be multiples of {custom['multiple']}, the "
                   f"longer side at most {custom['max_edge']} px and at most {custom['max_ratio']} times the shorter, "
                   f"and at most {custom['max_pixels']} pixels in all.", "size")
    raise _bad(f"Invalid size '{size}'. Supported sizes for {model} are {', '.join(rule['sizes'])}"
               + (", or a custom WIDTHxHEIGHT." if custom else "."), "size")


def _text(body: JSONDict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _bad(f"Invalid type for '{name}': expected a string.", name, "invalid_type")
    return value


INT_FIELDS = ("n", "output_compression", "partial_images", "frame_count", "frame_duration_ms")
# OpenAI's own fields are typed as OpenAI types them whatever the model (a model without a rule included): a
# provider must not be sent `user: {...}` or `background: true`.
TEXT_FIELDS = ("user", "background", "moderation", "output_format", "style", "input_fidelity")


def from_form(fields: JSONDict) -> JSONDict:
    """Multipart values arrive as text: give the known integer and boolean fields their JSON types."""
    typed = dict(fields)
    for name in INT_FIELDS:
        value = typed.get(name)
        if isinstance(value, str) and value.strip().lstrip("-").isdecimal():
            typed[name] = int(value)
    if isinstance(typed.get("stream"), str):
        typed["stream"] = typed["stream"].strip().lower() in ("true", "1")
    return typed


def check_request(body: JSONDict, *, endpoint: str) -> ImageRequest:
    """Check a client's fields against the rules; return the request to dispatch (input images not yet attached).

    Raises ``InvalidRequest`` naming the offending field in ``param``.
    """
    table = load_table()
    body = {k: v for k, v in body.items() if v is not None}
    model = _text(body, "model")
    if not model:
        gpt_only = endpoint == "generations" and any(name in body for name in table["gpt_image_only_fields"])
        model = table["default_gpt_image_model"] if gpt_only else table["default_model"][endpoint]
    prompt = _text(body, "prompt") or ""
    for name in TEXT_FIELDS:
        _text(body, name)
    for name in INT_FIELDS:
        if name in body and (isinstance(body[name], bool) or not isinstance(body[name], int)):
            raise _bad(f"Invalid type for '{name}': expected an integer.", name, "invalid_type")
    if not prompt and endpoint != "variations":
        raise _bad("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    rule = rule_for(model)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
    if stream and (endpoint == "variations" or (rule is not None and "partial_images" not in rule["fields"])):
        raise _bad(f"Streaming is not supported with model '{model}' on image {endpoint}.", "stream",
                   "unsupported_parameter")
    limits = rule or table["basic"]
    input_rule = limits.get(endpoint) if endpoint != "generations" else None
    if endpoint != "generations" and input_rule is None:
        raise _bad(f"Model '{model}' does not support image {endpoint}.", "model", "unsupported_model")
    # A model without a rule still gets a cap: a prompt of megabytes costs memory on its way to any provider.
    prompt_max = limits["prompt_max"] if limits["prompt_max"] is not None else settings.OPENOPEN8_DEFAULT_PROMPT_MAX
    if len(prompt) > prompt_max:
        raise _bad(f"Invalid 'prompt': string too long. Expected a string with maximum length {prompt_max} "
                   f"for {model}, but got a string with length {len(prompt)}.", "prompt", "string_above_max_length")
    body.setdefault("n", 1)
    _check_int(body, "n", 1, limits["n_max"])
    size, quality = _text(body, "size"), _text(body, "quality")
    response_format = _text(body, "response_format") or limits["default_response_format"]
    _check_choice(response_format, "response_format", limits["response_formats"], model)
    if rule is not None:
        model_specific = {*table["gpt_image_only_fields"], "style"}
        for name in body:
            if name in model_specific and name not in rule["fields"]:
                raise _bad(f"'{name}' is not supported with model '{model}'.", name, "unsupported_parameter")
        for name, spec in rule["fields"].items():
            if name in body:
                _check_field(body, name, spec, model)
        if size is not None:
            _check_size(size, rule, model)
        if quality is not None:
            _check_choice(quality, "quality", rule["qualities"], model)
        formats = rule.get("transparent_formats", [])
        if body.get("background") == "transparent" and body.get("output_format", "png") not in formats:
            raise _bad(f"A transparent background needs output_format {' or '.join(formats)}.", "background")
        size, quality = size or rule["default_size"], quality or rule["default_quality"]
        if not rule.get("upstream_response_format", True):
            body.pop("response_format", None)
    body["model"] = model
    return ImageRequest(endpoint=endpoint, model=model, prompt=prompt, n=body["n"], size=size, quality=quality,
                        response_format=response_format, fields=body, input_rule=input_rule, stream=stream)
