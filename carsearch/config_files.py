"""Typed YAML configs with overrides: a config file (a path, or a shipped config's name) read into a frozen,
validated dataclass, ``section.key=value`` overrides applied, unknown keys and wrong types refused in one line.

The pipeline's config (:mod:`carsearch.config`), the training recipes and the compare experiment's config are
all loaded here (:func:`load_dataclass`)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml

from carsearch.data.storage import read_failure
from carsearch.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # installed with the package


def config_names() -> dict[str, Path]:
    """The shipped configs by name (file stem): ``default``, ``offline``, ``compare``, ``cpu_quick``, …"""
    return {path.stem: path for path in sorted(CONFIGS_DIR.rglob("*.yaml"))}


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: an existing path, a shipped config's name (``cpu_quick``), or a path under ``configs/``
    as the repository lays it out (``configs/train/cpu_quick.yaml``), found in the installed package."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    names = config_names()
    if str(name_or_path) in names:
        return names[str(name_or_path)]
    parts = path.parts
    if parts and parts[0] == "configs" and (CONFIGS_DIR.joinpath(*parts[1:])).is_file():
        return CONFIGS_DIR.joinpath(*parts[1:])
    raise ConfigError(f"config file not found: {name_or_path} (shipped configs: {', '.join(names)})")


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (config validation)."""
    if not condition:
        raise ConfigError(message)


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` as type ``hint`` (a dataclass, union, Literal, tuple or scalar), or a ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a hint is a class, never an instance
        return from_dict(hint, value, f"{where}.")
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(args, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        return _coerce_tuple(args[0], value, where)
    scalar = _SCALARS.get(hint)
    return scalar(value, where) if scalar is not None else value


def _coerce_union(args: tuple[Any, ...], value: Any, where: str) -> Any:
    """None for an optional hint, else the first member type that accepts ``value``."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(arg, value, where)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError("; ".join(errors))


def _coerce_tuple(item: Any, value: Any, where: str) -> tuple[Any, ...]:
    """A list, or a comma-separated string, as a tuple of ``item``."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return tuple(_coerce(item, v, where) for v in value)


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{where}: expected true/false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    try:
        if isinstance(value, str) or float(value) == int(value):
            return int(value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return str(value)


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-serialisable dict of a config dataclass (tuples become lists)."""

    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(config))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict copy."""
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    if not isinstance(result, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(result).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return result


def resolve_paths(data: Any, folder: Path) -> Any:
    """A config file's values with relative paths resolved against the file's ``folder`` (like ultralytics'
    dataset YAMLs), so a config means the same from any working directory.

    The rule: a string that contains a ``/`` (or starts with ``~``) and is not a URI is a path; when
    ``folder / value`` exists it becomes that absolute path, otherwise it stays as written. Names
    (``yolo11n.pt``, ``cars98-lite1-320``, ``car``) are never touched.
    """
    if isinstance(data, dict):
        return {key: resolve_paths(value, folder) for key, value in data.items()}
    if isinstance(data, list):
        return [resolve_paths(value, folder) for value in data]
    if not isinstance(data, str) or "://" in data or not ("/" in data or data.startswith("~")):
        return data
    path = Path(data).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = folder / path
    return os.path.abspath(candidate) if candidate.exists() else data


def load_dataclass(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Config dataclass ``cls`` from a YAML file (a path or a shipped name; or defaults) with ``section.key=value``
    overrides."""
    data = read_config_file(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's mapping (a path or a shipped name), relative paths resolved (:func:`resolve_paths`);
    :class:`ConfigError` in one line when it cannot be read or is not a YAML mapping."""
    try:
        file = resolve_config(path)
        data = yaml.safe_load(file.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {read_failure(exc)}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections, got a {type(data).__name__}")
    return dict(resolve_paths(data, file.parent))
