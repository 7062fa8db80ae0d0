"""Typed, frozen, JSON-serialisable specs: one strict round trip for every layer.

A spec is a frozen dataclass deriving from `Spec`. `to_dict()` gives plain JSON values
(tuples become lists, enums their values, nested specs dicts); `from_dict()` reads them back,
refusing unknown keys and converting each value by the field's annotation (nested specs,
enums, tuples, optional values). Every spec checks itself on construction: `problems()`
lists what is wrong and `__post_init__` raises `SpecError` naming each one, so a spec that
exists is a valid spec, wherever it was built.

This module is import-light (standard library only): the HPS environment imports specs too.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import types
import typing
from typing import Any, TypeVar

S = TypeVar("S", bound="Spec")


class SpecError(ValueError):
    """A spec that cannot be built or read back; the message names each bad field."""


class Spec:
    """Mixin for frozen dataclasses: validation, strict JSON round trip, `replace`."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise SpecError(f"{type(self).__name__}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with this spec (empty when it is usable)."""
        return []

    # -- JSON ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls: type[S], data: Any) -> S:
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise SpecError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise SpecError(f"{cls.__name__}: unknown field(s) {unknown}; known: "
                            f"{', '.join(sorted(names))}")
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in data.items():
            values[key] = _coerce(value, hints[key], f"{cls.__name__}.{key}")
        try:
            return cls(**values)
        except TypeError as exc:  # a required field missing
            raise SpecError(f"{cls.__name__}: {exc}") from None

    @classmethod
    def from_json(cls: type[S], text: str | bytes) -> S:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SpecError(f"{cls.__name__}: not JSON ({exc})") from None
        return cls.from_dict(data)

    def replace(self: S, **changes) -> S:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, Spec):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` (plain JSON) as the annotated type; SpecError naming `where` otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise SpecError(f"{where}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except SpecError as exc:
                errors.append(str(exc))
        raise SpecError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of "
                        f"{[getattr(o, '__name__', str(o)) for o in options]}")
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, Spec):
        return hint.from_dict(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in hint)
            raise SpecError(f"{where}: {value!r} is not one of {allowed}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise SpecError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {type(value).__name__}")
        return value
    return value


# -- small checks shared by specs -----------------------------------------------------
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def check_choice(problems: list[str], name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        problems.append(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_number(problems: list[str], name: str, value: Any, *, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None,
                 integer: bool = False, optional: bool = False) -> None:
    """Append a problem unless `value` is a finite number within the bounds."""
    if value is None and optional:
        return
    if not (is_int(value) if integer else is_number(value)):
        kind = "an integer" if integer else "a number"
        problems.append(f"{name} must be {kind}, got {value!r}")
        return
    if minimum is not None and value < minimum:
        problems.append(f"{name} must be >= {minimum:g}, got {value!r}")
    elif above is not None and not value > above:
        problems.append(f"{name} must be > {above:g}, got {value!r}")
    elif maximum is not None and value > maximum:
        problems.append(f"{name} must be <= {maximum:g}, got {value!r}")
