"""Typed settings: a dataclass is the schema; YAML mappings, dotted overrides and command-line flags only fill it.

A setting is declared once, as a field: its type, default and docstring (or a flag's ``help``). Its allowed values
are a ``Literal`` type, or a registry (a dict whose keys are the names, read live) given as the field's ``choices``
metadata; ``allowed`` reads either, so validation, errors, the config reference and argparse ``choices`` agree. An
unknown key, a value of the wrong type or one outside the allowed set is a one-line ``ConfigError`` naming the dotted
key, because a silently ignored typo (``loss.aux_wieght``) would quietly run something else. No torch, no trainer:
every floor (data's requests, the job config, the study's spec, the CLI) reads it.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Collection
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration key or value; the message is one line naming it and the fix."""


def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (``from __future__ import annotations`` leaves strings)."""
    return typing.get_type_hints(cls)


def allowed(f: dataclasses.Field, tp: Any) -> Collection[Any] | None:
    """The values a field accepts: its ``choices`` metadata (a registry stands there itself), its Literal's values,
    or None (any value of its type)."""
    if "choices" in f.metadata:
        return f.metadata["choices"]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def choices(cls: type, name: str) -> Collection[Any] | None:
    """``allowed`` by class and field name."""
    return allowed(next(f for f in dataclasses.fields(cls) if f.name == name), hints(cls)[name])


def check_choice(value: Any, options: Collection[Any] | None, where: str, what: str = "config") -> Any:
    if options is not None and value not in options:
        raise ConfigError(f"{what} key '{where}' is {value!r}; choose one of {', '.join(map(str, options))}")
    return value


def coerce(value: Any, tp: Any, where: str, what: str = "config") -> Any:
    """Check ``value`` against the annotation ``tp``; YAML gives ints where floats are meant, which is fine. A
    dataclass type is loaded from a mapping (None: its defaults); a mapping's keys are read as strings."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        options = typing.get_args(tp)
        return check_choice(coerce(value, type(options[0]), where, what), options, where, what)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where, what)
            except ConfigError:
                pass
        raise ConfigError(f"{what} key '{where}' must be {tp}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{what} key '{where}' must be a list, got {value!r}")
        return [coerce(v, item_tp, f"{where}[{i}]", what) for i, v in enumerate(value)]
    if origin is dict:
        _, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{what} key '{where}' must be a mapping, got {value!r}")
        return {str(k): coerce(v, item_tp, f"{where}.{k}", what) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return load(tp, value or {}, where + ".", what)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string; ML configs write learning rates that way
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{what} key '{where}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _value(f: dataclasses.Field, tp: Any, value: Any, where: str, what: str) -> Any:
    """One field's value from its YAML value: its ``parse`` metadata (a rule its type cannot say, with its own
    one-line errors), else its type, then its allowed set."""
    if "parse" in f.metadata:
        return f.metadata["parse"](value, where)
    return check_choice(coerce(value, tp, where, what), allowed(f, tp), where, what)


def _fields(cls: type, values: Any, prefix: str, what: str) -> dict[str, dataclasses.Field]:
    if not isinstance(values, dict):
        raise ConfigError(f"{what} key '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown {what} key '{prefix}{key}': valid keys here are {', '.join(sorted(fields))}")
    return fields


def load(cls: type, values: Any, prefix: str = "", what: str = "config") -> Any:
    """A new ``cls`` from a mapping: each key a field (a missing one takes its default; one without a default must
    be given), each value checked as ``merge`` does. For frozen dataclasses and ones with required fields."""
    fields, types_ = _fields(cls, values, prefix, what), hints(cls)
    missing = [name for name, f in fields.items() if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{what} key '{prefix.rstrip('.') or 'top level'}' needs {', '.join(missing)} (its keys: "
                          f"{', '.join(fields)})")
    return cls(**{key: _value(fields[key], types_[key], value, prefix + key, what) for key, value in values.items()})


def merge(obj: Any, values: dict[str, Any], prefix: str = "", what: str = "config") -> Any:
    """Set ``obj``'s fields from a mapping, recursing into dataclass fields; returns ``obj``."""
    fields, types_ = _fields(type(obj), values, prefix, what), hints(type(obj))
    for key, value in values.items():
        where = f"{prefix}{key}"
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and "parse" not in fields[key].metadata:
            if not isinstance(value, dict):
                raise ConfigError(f"{what} key '{where}' is a section; give it a mapping, not {value!r}")
            merge(current, value, where + ".", what)
        else:
            setattr(obj, key, _value(fields[key], types_[key], value, where, what))
    return obj


def check_all(obj: Any, prefix: str = "") -> Any:
    """Every field of ``obj`` (and of its dataclass fields) within its allowed values: catches a value set in code."""
    types_ = hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_all(value, f"{prefix}{f.name}.")
        else:
            check_choice(value, allowed(f, types_[f.name]), f"{prefix}{f.name}")
    return obj


def parse_override(text: str) -> dict[str, Any]:
    """``section.key=value`` (the value a YAML scalar) -> the nested mapping ``merge`` takes."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    out: Any = yaml.safe_load(raw) if raw.strip() != "" else ""
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


# -- command-line flags ------------------------------------------------------------------------------------------

def flag(help: str | None = None, **argparse_kwargs: Any) -> dict[str, Any]:
    """A field's flag: its help and any argparse options its type does not give (``flags``: the option strings,
    default ``--`` + the name with dashes; ``positional``; a ``default`` other than the field's)."""
    return {"help": help, **argparse_kwargs}


def _plain(tp: Any) -> Any:
    """int for ``int | None``; the type of a Literal's values; a list's item type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _plain(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is Literal:
        return type(typing.get_args(tp)[0])
    if origin is list:
        return _plain(typing.get_args(tp)[0])
    return tp


def own_fields_first(cls: type) -> list[dataclasses.Field]:
    """A dataclass's fields, those it declares (or redeclares) itself before those it inherits: a command that
    inherits a shared flag group (cluster.commands.Scoring) still leads its --help with its own flags."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    own = [name for name in inspect.get_annotations(cls) if name in fields]  # in the order written
    return [fields[name] for name in own] + [f for name, f in fields.items() if name not in own]


def add_flags(parser: argparse.ArgumentParser, *classes: type) -> None:
    """One argument per field of each dataclass, from its type, default and ``flag`` metadata: the only way a
    command declares flags. Records the classes on the parser (``parser.settings``)."""
    for cls in classes:
        types_ = hints(cls)
        for f in own_fields_first(cls):
            options = dict(f.metadata)
            options.pop("choices", None)
            positional = options.pop("positional", False)
            tp = types_[f.name]
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if has_default:
                options.setdefault("default", f.default if f.default is not dataclasses.MISSING
                                   else f.default_factory())  # type: ignore[misc]
            if typing.get_origin(tp) is list:
                options.setdefault("nargs", "*" if has_default else "+")
            if tp is bool:
                options.setdefault("action", "store_true")
            elif _plain(tp) in (int, float):
                options.setdefault("type", _plain(tp))
            values = allowed(f, tp)
            if values is not None:
                options.setdefault("choices", tuple(values))
            if positional:  # a positional list's default is argparse's own (None); one without a default is required
                options.pop("default", None)
                parser.add_argument(f.name, **options)
                continue
            if not has_default:
                options.setdefault("required", True)
            parser.add_argument(*options.pop("flags", ("--" + f.name.replace("_", "-"),)), dest=f.name, **options)
    parser.settings = getattr(parser, "settings", ()) + classes  # type: ignore[attr-defined]


class Parser(argparse.ArgumentParser):
    """An argument parser whose out-of-choice flag value is the same one-line ConfigError as a YAML or override
    value, naming the flag (``flag '--precision' is 'fp33'; choose one of ...``), not argparse's own wording."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            name = action.option_strings[0] if action.option_strings else action.dest
            raise ConfigError(f"flag '{name}' is {value!r}; choose one of {', '.join(map(str, action.choices))}")


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``add_flags`` declared, filled from the parsed arguments."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
