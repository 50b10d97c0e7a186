"""One small settings system for both stages' dataclass configs.

- ``parse_overrides(["seed=3", ...], ConfigClass)``: ``--set KEY=VALUE`` strings converted by the
  field's annotated type (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``list[str]``,
  ``Literal[...]``); a bad key or value is a ``SettingsError`` naming it and what was expected.
- Presets are plain functions, ``def debug(**overrides) -> Config``, each returning
  ``make_config(Config, {**its settings, **overrides})``; ``pick_preset(PRESETS, name, **overrides)``
  calls one by name. Unknown presets and keys are ``SettingsError`` too.
- ``check_fields(config)`` from each config's ``__post_init__``: every field has its annotated type
  and every ``Literal`` field one of its choices (the one place where validation by type happens);
  ``check_range`` for the per-config range checks.

``SettingsError`` is a ``ValueError`` with a one-line message; the command line prints it as
``error: <message>`` and exits 2. The annotations are read with ``typing.get_type_hints``, so the
config modules may use ``from __future__ import annotations``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from typing import Any, Callable, Iterable, Literal, Mapping, TypeVar, Union

from lare2.shared.errors import UserError

T = TypeVar("T")

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_NONE = ("none", "null")


class SettingsError(UserError, ValueError):
    """A setting with an unknown key or a value of the wrong type or range; the message names both."""


@functools.lru_cache(maxsize=None)
def field_types(config_cls: type) -> dict[str, Any]:
    """``{field name: resolved annotation}`` of a dataclass (string annotations evaluated)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _optional_inner(annotation: Any) -> Any | None:
    """``X`` for ``X | None`` / ``Optional[X]``, else None."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def describe(annotation: Any) -> str:
    """What a value of ``annotation`` looks like, for error messages."""
    inner = _optional_inner(annotation)
    if inner is not None:
        return f"{describe(inner)} or none"
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"a comma-separated list of {describe(typing.get_args(annotation)[0])}s"
    plain = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return plain.get(annotation, str(annotation))


def convert(key: str, raw: str, annotation: Any) -> Any:
    """``raw`` (command-line text) as a value of ``annotation``; ``SettingsError`` when it is not one."""
    inner = _optional_inner(annotation)
    if inner is not None:
        return None if raw.strip().lower() in _NONE else convert(key, raw, inner)
    origin = typing.get_origin(annotation)
    try:
        if origin is Literal:
            for choice in typing.get_args(annotation):
                if raw == str(choice):
                    return choice
            raise ValueError
        if origin is list:
            (item,) = typing.get_args(annotation)
            return [convert(key, part.strip(), item) for part in raw.split(",") if part.strip()]
        if annotation is bool:
            lowered = raw.strip().lower()
            if lowered not in _TRUE + _FALSE:
                raise ValueError
            return lowered in _TRUE
        if annotation in (int, float):
            return annotation(raw)
        if annotation is str:
            return raw
    except ValueError:
        raise SettingsError(f"{key}={raw}: expected {describe(annotation)}") from None
    raise SettingsError(f"{key}: settings of type {annotation} cannot be given on the command line")


def _unknown_key(key: str, config_cls: type) -> SettingsError:
    known = ", ".join(sorted(field_types(config_cls)))
    return SettingsError(f"unknown setting {key!r} for {config_cls.__name__}; known settings: {known}")


def parse_overrides(pairs: Iterable[str], config_cls: type) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` (``--set``) -> ``{key: typed value}``; dashes in keys read as underscores.

    A field's old name (the config class's ``RENAMED_KEYS``, old name -> today's) is taken as today's, with a
    warning that names today's."""
    types_ = field_types(config_cls)
    renamed: Mapping[str, str] = getattr(config_cls, "RENAMED_KEYS", {})
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SettingsError(f"--set {pair!r}: expected KEY=VALUE")
        if key in renamed:
            from lare2.shared.logs import get_logger

            get_logger(__name__).warning(f"--set {key}: now called {renamed[key]}; use --set {renamed[key]}={raw}")
            key = renamed[key]
        if key not in types_:
            raise _unknown_key(key, config_cls)
        try:
            overrides[key] = convert(key, raw, types_[key])
        except SettingsError as err:
            raise SettingsError(f"--set {err}") from None
    return overrides


def make_config(config_cls: type[T], values: Mapping[str, Any]) -> T:
    """``config_cls(**values)``, with a one-line error for an unknown key. What every preset returns."""
    unknown = [k for k in values if k not in field_types(config_cls)]
    if unknown:
        raise _unknown_key(unknown[0], config_cls)
    return config_cls(**values)


def pick_preset(presets: Mapping[str, Callable[..., T]], name: str, **overrides: Any) -> T:
    """``presets[name](**overrides)``: the preset function called ``name``; a one-line error for an unknown one."""
    if name not in presets:
        raise SettingsError(f"preset {name!r}: choose from {', '.join(sorted(presets))}")
    return presets[name](**overrides)


def _matches(value: Any, annotation: Any) -> bool:
    inner = _optional_inner(annotation)
    if inner is not None:
        return value is None or _matches(value, inner)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(annotation, type) or isinstance(value, annotation)


def check_fields(config: Any) -> None:
    """Every field of a dataclass instance has its annotated type (Literal: one of the choices).

    Paths given for ``str`` fields become strings, ints for ``float`` fields floats, tuples for
    ``list`` fields lists (values read back from JSON or written in Python stay comparable)."""
    for key, annotation in field_types(type(config)).items():
        value = getattr(config, key)
        plain = _optional_inner(annotation) or annotation
        if isinstance(value, os.PathLike) and plain is str:
            value = os.fspath(value)
        elif isinstance(value, tuple) and typing.get_origin(plain) is list:
            value = list(value)
        elif plain is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _matches(value, annotation):
            raise SettingsError(f"{key}={value!r}: expected {describe(annotation)}")
        object.__setattr__(config, key, value)


def check_range(config: Any, key: str, *, min: float | None = None, max: float | None = None,
                below: float | None = None, above: float | None = None, multiple_of: int | None = None,
                why: str = "") -> None:
    """``getattr(config, key)`` within bounds (``min``/``max`` inclusive, ``above``/``below`` exclusive);
    None values pass. The message names the key, the value and the allowed range."""
    value = getattr(config, key)
    if value is None:
        return
    ok = ((min is None or value >= min) and (max is None or value <= max) and (above is None or value > above)
          and (below is None or value < below) and (multiple_of is None or value % multiple_of == 0))
    if not ok:
        bounds = [text for bound, text in ((min, f">= {min}"), (above, f"> {above}"), (max, f"<= {max}"),
                                           (below, f"< {below}"), (multiple_of, f"a multiple of {multiple_of}"))
                  if bound is not None]
        raise SettingsError(f"{key}={value!r}: expected {' and '.join(bounds)}" + (f" ({why})" if why else ""))
