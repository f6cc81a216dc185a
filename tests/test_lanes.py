"""The experiment lanes of scripts/experiments.sh are valid `fedpeft compare` commands: every
key, value, method, grid and --select-at of every lane passes the CLI's own checks (nothing
trains: the planned jobs are checked and dropped)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
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


RESULTS = SCRIPT.with_name("results.sh")


def fake_run(path: Path, done: int, rounds: int, summary: dict | None) -> None:
    """A run folder as fedpeft writes it: rounds 1..done logged, set to ``rounds``, a
    checkpoint, and a summary.json when ``summary`` is given."""
    path.mkdir(parents=True)
    (path / "config.toml").write_text(f'method = "fedlr"\nrounds = {rounds}\n')
    (path / "rounds.jsonl").write_text("".join(
        json.dumps({"round": r, "metrics": {"valid-accuracy": 0.1 * r}}) + "\n"
        for r in range(1, done + 1)))
    (path / "checkpoint.safetensors").write_bytes(b"weights")
    if summary is not None:
        (path / "summary.json").write_text(json.dumps({"rounds": done, **summary}, indent=2))


def test_results_keeps_the_checkpoints_a_chosen_rate_may_go_on_from(tmp_path):
    """scripts/results.sh commits the checkpoint of every rate `--select-at` stopped while no
    sibling rate has gone past it, also before any chosen rate has gone on (the summary says
    so), and drops those of finished runs and of rates a sibling has overtaken."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(RESULTS, tmp_path / "scripts" / "results.sh")
    exp = tmp_path / "runs" / "exp"
    early = {"select-at": {"round": 4, "rounds": 8}}
    # a lane cut right after its grid's rate runs: no run is set to 8 rounds yet
    fake_run(exp / "fresh" / "fedlr-s0-lr1e-3", 4, 4, early)
    fake_run(exp / "fresh" / "fedlr-s0-lr2e-3", 4, 4, early)
    # the same from logs older than the summary's "select-at": nothing tells they may go on
    fake_run(exp / "older" / "fedlr-s0-lr1e-3", 4, 4, {})
    # the chosen rate has gone on (unfinished): its sibling is no longer needed
    fake_run(exp / "going" / "fedlr-s0-lr1e-3", 4, 4, early)
    fake_run(exp / "going" / "fedlr-s0-lr2e-3", 6, 8, None)
    # a finished run, no grid
    fake_run(exp / "going" / "federa-s0", 8, 8, {})
    env = {**os.environ, "FEDPEFT": "true", "SAVE_CHECKPOINTS": "1"}
    subprocess.run(["bash", "scripts/results.sh"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    kept = sorted(str(p.parent.relative_to(tmp_path / "results" / "runs"))
                  for p in (tmp_path / "results" / "runs").rglob("checkpoint.safetensors"))
    assert kept == ["fresh/fedlr-s0-lr1e-3", "fresh/fedlr-s0-lr2e-3", "going/fedlr-s0-lr2e-3"]
    assert (tmp_path / "results" / "runs" / "older" / "fedlr-s0-lr1e-3" / "rounds.jsonl").exists()
