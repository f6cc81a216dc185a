"""docs/deployment.md's multi-machine guide, run as written on loopback: every block marked
``<!-- guide:NAME -->`` is executed with bash, the SuperLink and the SuperNodes in the
background (each in its own process group, all killed at the end), with the guide's variables
set to loopback values. TLS and node authentication are on, as in the guide; SuperNode 1 trains
on its own data file (--node-config train-file), SuperNode 0 on its partition."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from deploy_harness import BIN, ENV, ROOT, free_ports, rounds_of, serverapps, wait_for
from scaffold import alive_in_groups

GUIDE = ROOT / "docs" / "deployment.md"


def guide_blocks() -> dict[str, str]:
    text = GUIDE.read_text()
    return {m.group(1): m.group(2) for m in re.finditer(
        r"<!-- guide:([\w-]+) -->\s*```bash\n(.*?)```", text, flags=re.S)}


def test_the_guide_has_every_step():
    assert set(guide_blocks()) == {"certs", "superlink", "cli", "node", "node-own-data", "run",
                                   "resume"}


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


@pytest.mark.slow
def test_every_command_of_the_guide_on_loopback(tiny_models, tmp_path):
    blocks = guide_blocks()
    home = tmp_path / "fedpeft"
    port, node0, node1 = free_ports(3)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "night"]

    def rows(n, labels):
        return [(" ".join(rng.choice(words, 6)), labels[i % len(labels)]) for i in range(n)]

    _write_csv(home / "server" / "train.csv", rows(60, ["a", "b", "c"]))
    _write_csv(home / "server" / "test.csv", rows(20, ["a", "b", "c"]))
    _write_csv(home / "data" / "node1.csv", rows(31, ["c", "a"]))
    settings = (f"task=text-files train-file={home}/server/train.csv "
                f"test-file={home}/server/test.csv model={tiny_models('bert')} method=federa "
                "lora-rank=4 num-clients=2 clients-per-round=2 rounds=2 batch-size=16 "
                "lr=5e-3 progress=false threads=1")
    env = {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "SUPERLINK": "127.0.0.1", "PORT": str(port), "LISTEN": "127.0.0.1",
           "FEDPEFT_HOME": str(home), "FLWR_HOME": str(home / "flwr"), "SETTINGS": settings}
    groups: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def background(name, script, **extra):
        log = (logs / f"{name}.log").open("w")
        proc = subprocess.Popen(["bash", "-euc", script], env={**env, **extra}, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        groups.append(proc)
        return proc

    def foreground(name, script, timeout=240, **extra):
        done = subprocess.run(["bash", "-euc", script], env={**env, **extra}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        (logs / f"{name}.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, f"guide:{name} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def listening():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        foreground("certs", blocks["certs"])
        assert (home / "certs" / "node1.pub").exists()
        background("superlink", blocks["superlink"])
        wait_for("the SuperLink's port", listening, 60)
        time.sleep(1)
        out = foreground("cli", blocks["cli"])
        assert out.count("registered successfully") == 2 and out.count("registered │") == 2
        # the node blocks pin NODE and NODE_PORT; two nodes share this machine, so give the
        # second block its own port (as the guide says: NODE_PORT is the local port)
        background("node0", blocks["node"].replace("NODE_PORT=9094", f"NODE_PORT={node0}")
                   .replace("THREADS=$(nproc)", "THREADS=1"))
        background("node1", blocks["node-own-data"]
                   .replace("NODE_PORT=9095", f"NODE_PORT={node1}")
                   .replace("THREADS=$(nproc)", "THREADS=1"))
        run_out = foreground("run", blocks["run"], timeout=300)
        run = home / "runs" / "demo"
        assert "fedpeft: round 2/2" in run_out, run_out[-3000:]
        assert (run / "summary.json").exists()
        rounds = rounds_of(run)
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(r["successes"] == 2 and not r["failures"] and not r["rejected"]
                   for r in rounds), rounds
        assert any("partition 1" in n and "its own data" in n for n in rounds[0]["nodes"])

        # resume, extending the finished run to 3 rounds
        resumed = foreground("resume", blocks["resume"], timeout=300,
                             SETTINGS=settings.replace("rounds=2", "rounds=3"))
        assert "fedpeft: round 3/3" in resumed, resumed[-3000:]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["rounds"] == 3 and summary["resumed-from-round"] == 2
        assert [r["round"] for r in rounds_of(run)] == [1, 2, 3]
        # node 1 trained on its own 31 rows, node 0 on its partition of the server's 60
        worker1 = (logs / "node1.log").read_text()
        assert "train message completed" in worker1
    finally:
        pgids = {p.pid for p in groups}
        for proc in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in serverapps(port):  # the ServerApp the SuperLink started, wherever it is
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in groups:
            proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while (alive_in_groups(pgids) or serverapps(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = alive_in_groups(pgids) + serverapps(port)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running: {left}"
