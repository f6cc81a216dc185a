"""How settings are written: kebab-case keys, read from the command line (``key=value`` text),
from TOML and JSON files (typed values), and used as ``{key}`` placeholders in a run folder's
name, into the typed fields of a config dataclass (``fedpeft.config.RunConfig``).

Every function takes the dataclass, so that this module needs nothing of fedpeft's but
``ConfigError``; ``fedpeft.config`` calls it with ``RunConfig``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import string
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import ConfigError, kebab


@functools.cache
def _types(cls: type) -> dict[str, Any]:
    """Field name -> type annotation (resolved once per dataclass)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: tp for name, tp in typing.get_type_hints(cls).items() if name in names}


def field_name(cls: type, key: str) -> str:
    """The field a kebab-case ``key`` names; ConfigError with the closest keys otherwise."""
    name = key.replace("-", "_")
    known = _types(cls)
    if name not in known:
        close = difflib.get_close_matches(kebab(name), [kebab(n) for n in known], n=3,
                                          cutoff=0.75)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"unknown setting {key!r}{hint} (see `fedpeft run --help-config`)")
    return name


def _base_type(cls: type, name: str) -> tuple[Any, bool]:
    """The field's type without Optional, and whether None is allowed."""
    tp = _types(cls)[name]
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def parse(cls: type, name: str, raw: str) -> Any:
    """A command-line string for field ``name`` as that field's type."""
    tp, optional = _base_type(cls, name)
    if optional and raw.lower() in ("", "none", "null"):
        return None
    if typing.get_origin(tp) is list:
        return [s.strip() for s in raw.split(",") if s.strip()]
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{kebab(name)} must be true or false, got {raw!r}")
    try:
        return tp(raw)
    except ValueError:
        raise ConfigError(f"{kebab(name)} must be {tp.__name__}, got {raw!r}") from None


def coerce(cls: type, name: str, value: Any) -> Any:
    """A typed value (from TOML/JSON) checked against field ``name``."""
    tp, optional = _base_type(cls, name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{kebab(name)} cannot be empty")
    if isinstance(value, str) and tp is not str:
        return parse(cls, name, value)
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # sim-workers = 2 in a TOML file
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{kebab(name)} must be a list, got {value!r}")
        return [str(v) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{kebab(name)} must be {tp.__name__}, got {value!r}")
    return value


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings table of a TOML config file: a ``[fedpeft]`` table or the flat file;
    ConfigError naming the file for anything that is not a readable TOML table."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; expected a TOML file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); "
                          "expected a TOML file") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    data = data.get("fedpeft", data)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: `fedpeft` must be a table of settings, got "
                          f"{data!r}")
    return data


def fill_placeholders(setting: str, template: str, values: Mapping[str, Any]) -> str:
    """``template`` (the value of ``setting``, e.g. ``out``) with its ``{key}`` placeholders
    (``{alpha}``, ``{num-clients}``, format specs allowed) replaced by ``values`` (field name ->
    value); ConfigError for an unknown or malformed placeholder or an empty result."""
    usage = ("placeholders are {setting}, e.g. {task} or {num-clients}; write {{ and }} for "
             "a literal brace")
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(f"{setting}={template!r}: {err} ({usage})") from None
    parts = []
    for literal, name, spec, conversion in pieces:
        parts.append(literal)
        if name is None:
            continue
        key = name.replace("-", "_")
        if key not in values:
            close = difflib.get_close_matches(kebab(key), map(kebab, values), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            what = f"unknown setting {{{name}}}{hint}" if name else "an empty placeholder {}"
            raise ConfigError(f"{setting}={template!r}: {what}; {usage}; settings: "
                              f"{', '.join(kebab(n) for n in values)}")
        value = values[key]
        try:
            if conversion:
                value = {"r": repr, "a": ascii, "s": str}[conversion](value)
            parts.append(format(value, spec or ""))
        except KeyError:
            raise ConfigError(f"{setting}={template!r}: unknown conversion !{conversion} in "
                              f"{{{name}!{conversion}}} (!s, !r or !a)") from None
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{setting}={template!r}: {{{name}:{spec}}}: {err}") from None
    if not "".join(parts).strip():
        raise ConfigError(f"{setting} is empty; expected the path of a run folder")
    return "".join(parts)
