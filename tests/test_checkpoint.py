"""Checkpoint and resume: the file itself, what may change on resume, and resumed == uninterrupted
(in-process across SLoRA's stage switch, and a real `fedpeft run` killed with SIGKILL)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from inprocess import (  # noqa: F401
    flower_identity,
    run_inprocess,
    run_stopped_and_resumed,
    tiny_config,
)
from scaffold import alive_in_groups

from fedpeft import training
from fedpeft.config import ConfigError, RunConfig, load_config
from fedpeft.federation.checkpoint import (
    PRECISION_RAN,
    Checkpoint,
    check_resumable,
    load_checkpoint,
    resume_config,
    save_checkpoint,
    saved_config,
)
from fedpeft.runlog import RunExistsError, load_state, read_rounds


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    sampler = np.random.default_rng([0, 0x5A])
    sampler.choice(10, 3, replace=False)
    ckpt = Checkpoint(round=4, global_state={"a": np.arange(6, dtype=np.float32).reshape(2, 3)},
                      sampler=sampler.bit_generator.state, anchored=[3, 1],
                      method_state={"stage": 2}, history=[{"round": 1, "metrics": {}}],
                      anchor_id="abc", config=RunConfig().to_dict(), seconds=12.5)
    (tmp_path / "checkpoint.safetensors.tmp").write_text("half-written garbage of a crash")
    save_checkpoint(tmp_path, ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]
    back = load_checkpoint(tmp_path)
    assert back.round == 4 and back.anchored == [1, 3] and back.method_state == {"stage": 2}
    assert back.history == ckpt.history and back.anchor_id == "abc" and back.seconds == 12.5
    np.testing.assert_array_equal(back.global_state["a"], ckpt.global_state["a"])
    restored = np.random.default_rng(0)
    restored.bit_generator.state = back.sampler
    assert list(restored.choice(10, 3, replace=False)) == list(sampler.choice(10, 3, replace=False))
    assert load_checkpoint(tmp_path / "nothing-here") is None


def test_resume_may_change_how_but_not_what():
    saved = RunConfig(rounds=5).to_dict()
    check_resumable(saved, RunConfig(rounds=8, round_timeout=30.0, progress=False), done=5)
    with pytest.raises(ConfigError, match=r"lr: None -> 0.01"):
        check_resumable(saved, RunConfig(rounds=5, lr=0.01), done=2)
    with pytest.raises(ConfigError, match="already finished round 5"):
        check_resumable(saved, RunConfig(rounds=4), done=5)


def test_precision_is_compared_by_what_it_computes(monkeypatch):
    saved = {**RunConfig(rounds=5).to_dict(), PRECISION_RAN: "fp32"}  # auto that ran in fp32
    monkeypatch.setattr(training, "native_bf16", lambda device: True)  # here auto means bf16
    check_resumable(saved, RunConfig(rounds=8, precision="fp32"), done=5)  # as it ran
    with pytest.raises(ConfigError, match=r"trained its 5 rounds in fp32 \(precision=auto\), "
                       r"and precision=auto computes in bf16 here.*Pass precision=fp32"):
        check_resumable(saved, RunConfig(rounds=8), done=5)
    with pytest.raises(ConfigError, match=r"lr: None -> 0.01, precision: 'auto' -> 'auto'"):
        check_resumable(saved, RunConfig(rounds=8, lr=0.01), done=5)  # both named
    check_resumable(saved, RunConfig(rounds=5), done=5)  # finished: reused, nothing to train
    with pytest.raises(ConfigError, match="computes in bf16 here"):  # not what was asked for
        check_resumable(saved, RunConfig(rounds=5, precision="bf16"), done=5)
    monkeypatch.setattr(training, "native_bf16", lambda device: False)  # auto is fp32 here too
    check_resumable(saved, RunConfig(rounds=8), done=5)
    with pytest.raises(ConfigError, match="computes in bf16 here"):
        check_resumable(saved, RunConfig(rounds=8, precision="bf16"), done=5)
    # a run saved before the record is compared as written
    with pytest.raises(ConfigError, match=r"precision: 'auto' -> 'fp32'"):
        check_resumable(RunConfig(rounds=5).to_dict(), RunConfig(precision="fp32"), done=5)


def test_runs_record_the_precision_they_computed_in(tiny_models, tmp_path,
                                                    flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=1")  # precision=auto
    ran = run_inprocess(cfg)["precision"]
    assert ran in ("bf16", "fp32")
    assert load_checkpoint(cfg.run_dir()).config[PRECISION_RAN] == ran
    # a checkpoint written before the record: a finished run's summary says it
    old = load_checkpoint(cfg.run_dir())
    old.config.pop(PRECISION_RAN)
    save_checkpoint(cfg.run_dir(), old)
    assert saved_config(cfg.run_dir()) == ({**old.config, PRECISION_RAN: ran}, 1)
    # continued under the precision it ran in, spelt out: the same run, extended
    summary = run_inprocess(resume_config(cfg.run_dir(), ["rounds=2", f"precision={ran}"]),
                            resume=True)
    assert (summary["rounds"], summary["resumed-from-round"], summary["precision"]) == (2, 1, ran)
    assert load_checkpoint(cfg.run_dir()).config[PRECISION_RAN] == ran
    (cfg.run_dir() / "checkpoint.safetensors").unlink()  # a finished run without checkpoint
    assert saved_config(cfg.run_dir())[0][PRECISION_RAN] == ran


def test_run_folders_are_protected(tiny_models, tmp_path, flower_identity):  # noqa: F811
    with pytest.raises(ConfigError, match="not a run folder"):
        resume_config(tmp_path / "none")
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=1")
    first = run_inprocess(cfg)
    with pytest.raises(RunExistsError, match="--resume"):
        run_inprocess(cfg)
    # resuming a finished run returns its summary without training again
    assert run_inprocess(resume_config(cfg.run_dir()), resume=True) == first


@pytest.mark.parametrize("method", ["federa", "slora"])
def test_resumed_run_equals_uninterrupted_run(tiny_models, tmp_path, method,
                                              flower_identity):  # noqa: F811
    extra = ["slora-stage1-rounds=2", "slora-density=0.1"] if method == "slora" else []
    # stopped after round 2: SLoRA switches to LoRA at the end of round 2
    _, _, expected, resumed = run_stopped_and_resumed(
        tiny_models("bert"), tmp_path, 4, 2, f"method={method}", "fail-rate=0.3", *extra)
    _assert_same_run(tmp_path / "full", tmp_path / "part", expected, resumed)
    assert resumed["resumed-from-round"] == 2


def test_killed_before_the_first_checkpoint_resumes_without_a_duplicate_round(
        tiny_models, tmp_path, flower_identity):  # noqa: F811
    # A SIGKILL between round 1's log line and its checkpoint leaves rounds.jsonl with round 1
    # and no checkpoint: the resume starts over and logs round 1 once.
    full = tiny_config(tiny_models("bert"), str(tmp_path / "full"), "rounds=2")
    expected = run_inprocess(full)
    part = tiny_config(tiny_models("bert"), str(tmp_path / "part"), "rounds=1")
    run_inprocess(part)
    for name in ("checkpoint.safetensors", "summary.json", "final_state.safetensors"):
        (tmp_path / "part" / name).unlink()
    assert [r["round"] for r in read_rounds(tmp_path / "part")] == [1]
    resumed = run_inprocess(resume_config(part.run_dir(), ["rounds=2"]), resume=True)
    assert [r["round"] for r in read_rounds(tmp_path / "part")] == [1, 2]
    _assert_same_run(tmp_path / "full", tmp_path / "part", expected, resumed)
    assert resumed["resumed-from-round"] == 0


def _assert_same_run(run_a, run_b, summary_a, summary_b):
    a = load_state(run_a / "final_state.safetensors")
    b = load_state(run_b / "final_state.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert summary_a["final"] == summary_b["final"] and summary_a["best"] == summary_b["best"]
    assert summary_a["failures"] == summary_b["failures"]
    ra, rb = read_rounds(run_a), read_rounds(run_b)
    assert [(r["round"], r["clients"], r["train-loss"], r["metrics"]) for r in ra] == \
        [(r["round"], r["clients"], r["train-loss"], r["metrics"]) for r in rb]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy=fedadam", "server-lr=0.01"],
                                      ["strategy=fedavgm", "server-momentum=0.9"]],
                         ids=["fedadam", "fedavgm"])
def test_sigkill_mid_round_then_resume_equals_uninterrupted(tiny_models, tmp_path, strategy,
                                                           flower_identity):  # noqa: F811
    """`fedpeft run` (Flower simulation) killed with SIGKILL in round 2, then `--resume`d: the
    server optimiser's moments / momentum come back from the checkpoint too. The uninterrupted
    reference runs in-process (the same ServerApp and ClientApp code without Ray, bit for bit
    the simulation's result, and a CLI run cheaper); plain FedAvg's resume is checked in-process
    above and after a SIGKILLed ServerApp in test_deploy_crashes.py."""
    settings = [f"model={tiny_models('bert')}", "method=federa", "lora-rank=4", "num-clients=4",
                "clients-per-round=2", "rounds=3", "max-train-samples=64", "max-test-samples=32",
                "batch-size=16", "lr=5e-3", "threads=1", "progress=false", "fail-rate=0.2",
                *strategy]
    cli = [sys.executable, "-m", "fedpeft.cli", "run"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    summary_ref = run_inprocess(load_config(None, [*settings, f"out={ref}"]))

    proc = subprocess.Popen([*cli, *settings, f"out={killed}"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            ckpt = killed / "checkpoint.safetensors"
            if ckpt.exists() and (c := _safe_load(killed)) is not None and c.round >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Ray processes, everything it started
        proc.wait(timeout=30)
    assert _wait_group_gone(proc.pid), "processes of the killed run are still alive"
    at_kill = load_checkpoint(killed).round
    assert at_kill < 3 and not (killed / "summary.json").exists()

    out = subprocess.run([*cli, "--resume", str(killed)], check=True, capture_output=True,
                         text=True, timeout=240)
    assert "run folder" in out.stdout
    summary_res = json.loads((killed / "summary.json").read_text())
    _assert_same_run(ref, killed, summary_ref, summary_res)
    assert summary_res["resumed-from-round"] == at_kill
    print(f"\nkilled after round {at_kill}; resumed final {summary_res['final']} == "
          f"uninterrupted {summary_ref['final']}; final state bitwise equal")


def _wait_group_gone(pgid, timeout=20.0):
    """Whether every live (non-zombie) process of process group ``pgid`` is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive_in_groups({pgid}):
            return True
        time.sleep(0.2)
    return False


def _safe_load(run_dir):
    try:
        return load_checkpoint(run_dir)
    except Exception:  # caught between writes of another format: try again
        return None
