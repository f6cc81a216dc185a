"""Keep Flower and Ray on loopback: no telemetry, update checks or cloud probes.

Out of the box Flower sends telemetry and checks for updates, and Ray probes cloud metadata
endpoints, discovers a public IP and binds to the machine's external address. Every fedpeft
process that starts Flower or Ray calls ``apply()`` first (the CLI does, ``fedpeft.federation``
does on import, and the tests' conftest does). Settings the user already exported win.

Ray's cloud-metadata probe stops only when ``$HOME/ray_bootstrap_config.yaml`` exists, so
``HOME`` is pointed at a small folder of ours holding that file; the caches that normally live
under the real home (Hugging Face, torch, XDG) are pinned to the real home first, so models
the user has downloaded are still found.
"""

from __future__ import annotations

import os
from pathlib import Path

SETTINGS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # on Linux: Ray binds and advertises 127.0.0.1
    "RAY_DEDUP_LOGS": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GRPC_ENABLE_FORK_SUPPORT": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}

_applied = False


def apply() -> None:
    """Set the loopback-only environment (idempotent). Call before importing flwr or ray.

    Only Flower's and Ray's own network features are turned off. The Hugging Face hub is left to
    the user's environment: with network access ``model=roberta-base`` downloads as usual, and
    ``HF_HUB_OFFLINE=1`` (which the tests and CI set) keeps transformers off the network."""
    global _applied
    if _applied:
        return
    for key, value in SETTINGS.items():
        os.environ.setdefault(key, value)
    real_home = Path(os.environ.get("HOME") or Path.home())
    if not (real_home / "ray_bootstrap_config.yaml").exists():
        cache = Path(os.environ.get("XDG_CACHE_HOME") or real_home / ".cache")
        os.environ.setdefault("XDG_CACHE_HOME", str(cache))
        os.environ.setdefault("HF_HOME", str(cache / "huggingface"))
        os.environ.setdefault("TORCH_HOME", str(cache / "torch"))
        home = cache / "fedpeft" / "home"
        home.mkdir(parents=True, exist_ok=True)
        bootstrap = home / "ray_bootstrap_config.yaml"
        if not bootstrap.exists():
            bootstrap.write_text("provider:\n  type: local\n")
        os.environ["HOME"] = str(home)
    os.environ.setdefault("FLWR_HOME", str(Path(os.environ["HOME"]) / ".flwr"))
    quiet_warnings()
    _applied = True


def quiet_warnings() -> None:
    """Hide library deprecation chatter that says nothing about the user's run."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"peft(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\..*)?")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
