"""A real Flower deployment on loopback: a SuperLink, 2 SuperNodes (each with its warm worker),
`flwr run` of the deploy/ app, 2 rounds of a tiny model, then every process is stopped."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scaffold import alive_in_groups

from fedpeft.federation.deploy import read_run_config
from fedpeft.runlog import load_state, read_rounds

ROOT = Path(__file__).resolve().parents[1]


def test_run_config_of_the_deployed_app(tmp_path):
    cfg, resume, overwrite = read_run_config({
        "config": "", "settings": f"rounds=3 num-clients=2 clients-per-round=2 out={tmp_path}",
        "resume": True, "overwrite": False})
    assert (cfg.rounds, cfg.num_clients, resume, overwrite) == (3, 2, True, False)
    from fedpeft.config import ConfigError

    with pytest.raises(ConfigError, match="absolute path"):
        read_run_config({"settings": "out=runs/x"})
    with pytest.raises(ConfigError, match="unknown run-config keys"):
        read_run_config({"rounds": 3})


def _free_ports(n):
    from deploy_harness import free_ports

    return free_ports(n)


def _kill_groups(pids):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow
def test_two_supernodes_on_loopback_run_two_rounds(tiny_models, tmp_path):
    work, out = tmp_path / "deploy", tmp_path / "deploy" / "run"
    port, node_port = _free_ports(2)
    env = {**os.environ, "FEDPEFT_DEPLOY_DIR": str(work), "FEDPEFT_PORT": str(port),
           "FEDPEFT_NODE_PORT": str(node_port), "FEDPEFT_OUT": str(out),
           "VENV_BIN": str(Path(sys.executable).parent)}
    settings = [f"model={tiny_models('bert')}", "method=federa", "lora-rank=4", "rounds=2",
                "max-train-samples=64", "max-test-samples=32", "batch-size=16", "lr=5e-3",
                "threads=1", "round-timeout=120", "progress=false"]
    started = time.monotonic()
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "deploy_local.sh"), "2", *settings],
                            env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        groups = [proc.pid]
        if (work / "pids").exists():
            groups += [int(p) for p in (work / "pids").read_text().split()]
        if proc.poll() is None:
            _kill_groups(groups)
            proc.wait(timeout=30)
    seconds = time.monotonic() - started
    deadline = time.monotonic() + 20
    while alive_in_groups(groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = alive_in_groups(groups)
    _kill_groups(groups)
    assert not leftover, f"processes left running: {leftover}"
    assert proc.returncode == 0, output[-3000:]

    rounds = read_rounds(out)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["successes"] == 2 and not r["failures"] and not r["rejected"] for r in rounds)
    assert all("accuracy" in r["metrics"] for r in rounds)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frozen-digest-start"] == summary["frozen-digest-end"]
    final = load_state(out / "final_state.safetensors")
    assert all(np.all(np.isfinite(v)) for v in final.values())
    assert "fedpeft: round 2/2" in output
    print(f"\ndeployment: 2 SuperNodes, 2 rounds in {seconds:.0f} s end to end; round seconds "
          f"{[round(r['seconds'], 1) for r in rounds]}")
