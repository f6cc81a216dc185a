"""The experiment lanes of scripts/experiments.sh are valid `fedpeft compare` commands: every
key, value, method, grid and --select-at of every lane passes the CLI's own checks (nothing
trains: the planned jobs are checked and dropped)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

import fedpeft.compare
from fedpeft.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "experiments.sh"
LANES = ["main", "grid", "later", "strategies", "family", "protocol", "decoders", "squad"]


def lane_commands(lane: str) -> list[list[str]]:
    """The `fedpeft compare` argument lists a lane would run (``DRY_RUN=1``)."""
    env = {**os.environ, "DRY_RUN": "1", "RESTORE": "0", "FEDPEFT": "fedpeft"}
    out = subprocess.run(["bash", str(SCRIPT), lane], env=env, capture_output=True, text=True,
                         check=True).stdout
    commands = [shlex.split(line)[2:] for line in out.splitlines() if line.startswith("fedpeft ")]
    assert commands, f"lane {lane} printed no command"
    return commands


@pytest.mark.parametrize("lane", LANES)
def test_every_lane_command_passes_the_cli_checks(lane, tmp_path, monkeypatch, capsys):
    checked = []

    def plan_only(jobs, *args, **kwargs):
        select_at = args[1] if len(args) > 1 else kwargs.get("select_at")
        if isinstance(select_at, int):
            fedpeft.compare.check_select_at(jobs, select_at)
        for job in jobs:
            job.cfg.resolved()
        checked.extend(jobs)
        return []

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fedpeft.compare, "run_selected", plan_only)
    monkeypatch.setattr(fedpeft.compare, "run_jobs", plan_only)
    for argv in lane_commands(lane):
        assert main(["compare", *argv]) == 0, (argv, capsys.readouterr().err)
    assert checked and not any(tmp_path.iterdir())  # jobs were planned; nothing was written


def test_a_wrong_lane_part_is_refused():
    env = {**os.environ, "DRY_RUN": "1", "RESTORE": "0"}
    for lane in ("family", "protocol"):
        done = subprocess.run(["bash", str(SCRIPT), lane, "nope"], env=env, capture_output=True,
                              text=True)
        assert done.returncode == 2 and "got 'nope'" in done.stderr
