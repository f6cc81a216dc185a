"""A Flower deployment on loopback for tests: a SuperLink, SuperNodes with warm workers, `flwr
run`, each process in its own process group so that a test can kill any one of them (SIGKILL
mid-round) and restart it, and ``stop`` kills every group it started (call it in ``finally``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from scaffold import alive_in_groups

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
       # a message of a killed ServerApp's run can never be pulled: give up on it within the
       # tests' waits (latency.MAX_TIME_ENV), so the resumed run finds the worker free
       "FEDPEFT_PULL_MAX_TIME": "30"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make_certs(folder: Path, nodes: int) -> Path:
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(folder), "127.0.0.1",
                    str(nodes)], check=True, capture_output=True, timeout=120)
    return folder


class Deployment:
    def __init__(self, work: Path, certs: Path | None = None) -> None:
        self.work = work
        self.certs = certs
        self.port, *self.node_ports = free_ports(9)
        self.groups: dict[str, subprocess.Popen] = {}
        self.all_groups: set[int] = set()
        work.mkdir(parents=True, exist_ok=True)
        (work / "cli").mkdir(exist_ok=True)
        security = (f'root-certificates = "{certs / "ca.crt"}"' if certs else "insecure = true")
        (work / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n')

    # --- processes -----------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **ENV, "FLWR_HOME": str(home),
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        log = (self.work / f"{name}.log").open("a")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.work)
        log.close()
        self.groups[name] = proc
        self.all_groups.add(proc.pid)
        return proc

    def start_superlink(self) -> None:
        security = (["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile",
                     str(self.certs / "server.crt"), "--ssl-keyfile",
                     str(self.certs / "server.key"), "--enable-supernode-auth"]
                    if self.certs else ["--insecure"])
        self._start("superlink", [str(BIN / "flower-superlink"), *security,
                                  "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(self.port),
                                  "--database", str(self.work / "state.db")],
                    self.work / "superlink-home")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {**os.environ, **ENV, "FLWR_HOME": str(self.work / "cli")}
        return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.work)

    def register(self, k: int, deadline: float = 60) -> None:
        """Register node k's public key (retrying until the SuperLink answers)."""
        end = time.monotonic() + deadline
        while True:
            done = self.flwr("supernode", "register", str(self.certs / f"node{k}.pub"), "local")
            if done.returncode == 0:
                return
            if time.monotonic() > end:
                raise AssertionError(f"could not register node{k}: {done.stdout}{done.stderr}")
            time.sleep(1)

    def start_node(self, k: int, extra: str = "", num: int = 2) -> None:
        """SuperNode k (partition k, one thread) in --isolation process, and its worker."""
        security = (["--root-certificates", str(self.certs / "ca.crt"),
                     "--auth-supernode-private-key", str(self.certs / f"node{k}")]
                    if self.certs else ["--insecure"])
        self._start(f"node{k}", [
            str(BIN / "python"), "-m", "fedpeft.federation.supernode", *security,
            "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
            "--port", str(self.node_ports[k]), "--isolation", "process",
            "--node-config", f"partition-id={k} num-partitions={num} threads=1 {extra}"],
            self.work / f"node{k}-home")
        self._start(f"worker{k}", [str(BIN / "python"), "-m", "fedpeft.federation.worker",
                                   "--runtime-api", f"127.0.0.1:{self.node_ports[k]}"],
                    self.work / f"node{k}-home")

    def run(self, settings: list[str], resume: bool = False, **extra: str) -> str:
        """``flwr run deploy local`` (returns at once; the run goes on in the SuperLink)."""
        config = " ".join([f"settings='{' '.join(settings)}'",
                           f"resume={'true' if resume else 'false'}",
                           *(f"{k.replace('_', '-')}={v}" for k, v in extra.items())])
        end = time.monotonic() + 60
        while True:
            done = self.flwr("run", str(ROOT / "deploy"), "local", "--run-config", config)
            if done.returncode == 0:
                return done.stdout
            if time.monotonic() > end or "Invalid run configuration" in done.stdout:
                raise AssertionError(f"flwr run failed: {done.stdout}{done.stderr}")
            time.sleep(1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a service's whole process group (its SuperExec and apps too)."""
        proc = self.groups.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def serverapp_pids(self) -> list[int]:
        return serverapps(self.port)

    def stop(self) -> list[int]:
        """SIGKILL every process group this deployment started; the pids still alive after."""
        for proc in self.groups.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.groups.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        self.groups.clear()
        for pid in self.serverapp_pids():  # in case one left its group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while ((alive_in_groups(self.all_groups) or self.serverapp_pids())
               and time.monotonic() < deadline):
            time.sleep(0.2)
        left = alive_in_groups(self.all_groups) + self.serverapp_pids()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def serverapps(port: int) -> list[int]:
    """The live ``flwr-serverapp`` processes of the SuperLink on ``port`` (found by their command
    line: their Runtime API address is the SuperLink's port)."""
    found = []
    needle = f"127.0.0.1:{port}".encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().replace(b"\0", b" ")
            stat = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"flwr-serverapp" in cmd and needle in cmd and stat[0] != "Z":
            found.append(int(cmdline.parent.name))
    return found


def rounds_of(run: Path) -> list[dict]:
    path = run / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(what, predicate, timeout: float, deployment: Deployment | None = None,
             poll: float = 0.2):
    """Poll ``predicate()`` until it is truthy; fail with the logs after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    logs = ""
    if deployment is not None:
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted(deployment.work.glob("*.log")))
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
