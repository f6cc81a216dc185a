"""Tensors a client keeps between rounds (FedSA-LoRA's own B), on disk, versioned by round.

One worker process serves many clients in a simulation, and a deployed SuperNode may restart, so
a client's own tensors live neither in a worker's memory nor only in Flower's ``context.state``
(which a killed and resumed run does not keep): they live in files, one per client and version::

    <root>/<run-key>/client-<k>/round-<t>.safetensors

- ``root``: the SuperNode's ``--node-config "state-dir=/path"`` when it is set (a deployed node
  on another machine); else the folder the server names in every message (``client-store``:
  ``<run>/clients``), which simulation workers, in-process tests and SuperNodes on the server's
  machine share with the server. ``state_root`` decides.
- ``run-key``: the run folder's name and a random id made when the run folder is created
  (``run_key``: kept in ``<run>/clients/run-key``, so a resumed run finds its clients' files and
  a run made again with ``--overwrite`` never reads the files of the run it replaced, even in a
  SuperNode's ``state-dir`` that outlives run folders).
- version ``t`` = the tensors after the client's local training in round ``t``. A client training
  in round ``t`` starts from its newest version before ``t`` (``load``), so a round that is
  replayed after a crash, or retried, starts from the same tensors as the first time; then it
  writes version ``t`` and deletes every version older than the one it started from (``save``):
  at most two versions per client remain (the one a replay of round ``t`` needs, and ``t``).

Files are written to a temporary name, flushed and renamed, so a crash never leaves half a file.
A finished run's folder under a SuperNode's ``state-dir`` can be deleted by hand.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

_VERSION = re.compile(r"^round-(\d+)\.safetensors$")


def run_key(run_dir: str | Path) -> str:
    """``<run folder name>-<random id>``, made once per run folder (``<run>/clients/run-key``)."""
    run_dir = Path(run_dir)
    file = run_dir / "clients" / "run-key"
    if file.exists():
        return file.read_text(encoding="utf-8").strip()
    file.parent.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", run_dir.resolve().name) or "run"
    key = f"{name}-{secrets.token_hex(6)}"
    tmp = file.with_name("run-key.tmp")
    tmp.write_text(key + "\n", encoding="utf-8")
    os.replace(tmp, file)
    return key


def state_root(state_dir: str, config: Mapping[str, Any]) -> Path:
    """Where this node keeps client state: its ``state-dir`` (``nodedata.NodeSettings``), else
    the server's ``client-store``."""
    if state_dir:
        return Path(state_dir).expanduser()
    sent = str(config.get("client-store", "") or "")
    if not sent:
        raise RuntimeError("this method keeps state on the client, but neither the server "
                           "(client-store) nor this node (--node-config state-dir=...) names "
                           "a folder for it")
    return Path(sent)


class ClientStore:
    """The versioned files of one run's clients under ``root/<key>``."""

    def __init__(self, root: str | Path, key: str) -> None:
        if not key or "/" in key or key in (".", ".."):
            raise ValueError(f"bad client-store key {key!r}")
        self.folder = Path(root) / key

    def _client(self, client: int) -> Path:
        return self.folder / f"client-{int(client)}"

    def versions(self, client: int) -> list[int]:
        """The rounds client ``client`` has saved tensors for, ascending."""
        folder = self._client(client)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION.match(p.name)))

    def latest_before(self, client: int, server_round: int) -> int | None:
        """The newest version saved before round ``server_round`` (None: none yet)."""
        older = [v for v in self.versions(client) if v < server_round]
        return older[-1] if older else None

    def load(self, client: int, version: int) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self._client(client) / f"round-{version}.safetensors"))

    def save(self, client: int, version: int, state: Mapping[str, np.ndarray],
             started_from: int | None) -> Path:
        """Write version ``version`` atomically; then delete the versions older than
        ``started_from`` (the one this round began with, which a replay of it needs again)."""
        from safetensors.numpy import save_file

        folder = self._client(client)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RuntimeError(f"cannot create the client-state folder {folder} ({err.strerror}); "
                               "on a deployed SuperNode give it a writable folder with "
                               '--node-config "state-dir=/path"') from None
        target = folder / f"round-{version}.safetensors"
        tmp = folder / f".round-{version}.safetensors.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        keep = {version} | ({started_from} if started_from is not None else set())
        floor = started_from if started_from is not None else version
        for old in self.versions(client):
            if old not in keep and old < floor:
                (folder / f"round-{old}.safetensors").unlink(missing_ok=True)
        return target


def open_store(state_dir: str, config: Mapping[str, Any]) -> ClientStore:
    """The store a client message asks for (``client-store``, ``client-store-key``)."""
    return ClientStore(state_root(state_dir, config), str(config.get("client-store-key", "")))
