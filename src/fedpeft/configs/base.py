"""What every config dataclass of fedpeft is made of: ``setting`` fields and ``ConfigError``."""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

from ..errors import FedpeftError


class ConfigError(FedpeftError, ValueError):
    """A setting is unknown, malformed or inconsistent with another one."""


def setting(default: Any, help: str = "", *, resumable: bool = False,
            structural: bool = True) -> Any:
    """A config field with its help text and what it may change.

    ``resumable``: it steers how the remaining rounds are run, not what the run computes, so a
    resumed run, or a finished run that ``fedpeft compare`` reuses, may differ in it (every other
    setting must be equal, else the runs are different runs). ``structural=False``: the model,
    the data and the partition do not depend on it, so a process's cached runtime survives a
    change of it (``federation/runtime.py``).
    """
    return field(default=default,
                 metadata={"help": help, "resumable": resumable, "structural": structural})


def kebab(name: str) -> str:
    return name.replace("_", "-")


def check_finite(cfg: Any, *names: str) -> None:
    """ConfigError naming the first of ``names`` whose value is not a finite number."""
    for name in names:
        if not math.isfinite(getattr(cfg, name)):
            raise ConfigError(f"{kebab(name)} must be a finite number, got {getattr(cfg, name)}")
