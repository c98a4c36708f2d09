"""JSON read strictly, for the weights manifest: duplicate keys remembered, NaN/Infinity kept
as refusable values, and nesting measured before parsing (the parser recurses once per level)."""
from __future__ import annotations

import contextlib
import json
import math
import re
from typing import Any


class _Object(dict):
    """A JSON object that remembers the keys it was given more than once."""

    duplicates: tuple[str, ...] = ()


class _NonFinite(str):
    """NaN, Infinity or a number too large for a float: not JSON, refused."""


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"\s*:?|[][{},]')


def too_deep(text: str, limit: int) -> str | None:
    """The JSON path at which ``text`` nests more than ``limit`` containers, found without
    parsing it (the parser recurses once per level); None if it does not."""
    stack: list[list] = []  # [is_object, key or index]
    for match in _TOKEN.finditer(text):
        token = match[0]
        if token in "{[":
            if len(stack) == limit:
                return "$" + "".join((f".{key}" if isinstance(key, str) and re.fullmatch(r"\w+", key) else
                                      f"[{json.dumps(key)}]") if is_object else f"[{key}]" for is_object, key in stack)
            stack.append([token == "{", "" if token == "{" else 0])
        elif token in "]}" and stack:
            stack.pop()
        elif token == "," and stack and not stack[-1][0]:
            stack[-1][1] += 1
        elif token.endswith(":") and stack and stack[-1][0]:
            with contextlib.suppress(ValueError):
                stack[-1][1] = json.loads(token[:-1].rstrip())
    return None


def parse(text: str) -> Any:
    def pairs(items):
        obj = _Object(items)
        keys = [k for k, _ in items]
        obj.duplicates = tuple(sorted({k for k in keys if keys.count(k) > 1}))
        return obj

    def number(literal: str):
        value = float(literal)
        return value if math.isfinite(value) else _NonFinite(literal)

    return json.loads(text, object_pairs_hook=pairs, parse_constant=_NonFinite, parse_float=number)


def json_problems(value: Any, path: str, problems: list[str]) -> None:
    """Duplicate keys and non-finite numbers anywhere in ``value``."""
    if isinstance(value, dict):
        for key in getattr(value, "duplicates", ()):
            problems.append(f"{path}.{key}: the key appears more than once (JSON would keep only the last)")
        for key, item in value.items():
            json_problems(item, f"{path}.{key}", problems)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            json_problems(item, f"{path}[{i}]", problems)
    elif isinstance(value, _NonFinite) or (isinstance(value, float) and not math.isfinite(value)):
        problems.append(f"{path}: {value} is not a finite number; NaN and Infinity are not allowed")
