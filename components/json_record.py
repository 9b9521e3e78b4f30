"""Frozen dataclasses stored as JSON files (checkpoint ``meta.json``, bundle ``bundle.json``):
one reader whose errors name the file and what is wrong with it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

T = TypeVar("T")


def parse_record(
    cls: type[T], text: str, where: str, error: type[Exception], *, version: int, strict: bool = False
) -> T:
    """``cls`` from JSON ``text`` read at ``where``: an object whose ``format`` is ``version``,
    holding every field without a default (and, when ``strict``, nothing else)."""
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON ({exc}); truncated or corrupt") from exc
    if not isinstance(data, dict):
        raise error(f"{where} holds {type(data).__name__}, not a {cls.__name__} record")
    if data.get("format") != version:
        raise error(f"{where} has format {data.get('format')!r}; this code reads {version}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = {
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise error(f"{where} lacks field(s) {missing}")
    unknown = sorted(set(data) - set(fields))
    if strict and unknown:
        raise error(f"{where} has unknown field(s) {unknown}")
    return cls(**{k: v for k, v in data.items() if k in fields})
