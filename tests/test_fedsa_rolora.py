"""FedSA-LoRA (A shared, B kept on each client) and RoLoRA (alternating A / B rounds): what
travels (checked on the messages themselves), what changes per round, the client store and its
replay rule, SIGKILL + resume, payload counts, the SVD start, refused combinations, and two
rounds on each tiny architecture."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from inprocess import (  # noqa: F401
    InProcessGrid,
    flower_identity,
    run_inprocess,
    run_stopped_and_resumed,
    tiny_config,
)
from test_checkpoint import _assert_same_run, _safe_load

from fedpeft.budget import method_budget
from fedpeft.config import ConfigError, load_config
from fedpeft.federation.checkpoint import load_checkpoint
from fedpeft.federation.client_store import ClientStore, run_key
from fedpeft.federation.runtime import Runtime
from fedpeft.federation.server_app import open_run, run_server
from fedpeft.federation.state import from_record
from fedpeft.runlog import load_state, read_rounds

ARCHS = ["bert", "roberta", "deberta-v2", "distilbert"]


def is_a(key):
    return ".lora_A." in key


def is_b(key):
    return ".lora_B." in key


def run_capturing(cfg):
    """An in-process run that records every message's arrays (down) and every reply's arrays
    (up), and the global state after each round (from the checkpoint)."""
    grid = InProcessGrid(cfg.num_clients)
    up, states = [], {}

    def tamper(pid, content):
        up.append((pid, from_record(content["arrays"])))
        return content

    def after(record):
        states[record["round"]] = load_checkpoint(cfg.run_dir()).global_state

    grid.tamper = tamper
    log, runtime, _ = open_run(cfg)
    initial = runtime.method.export_state(runtime.model)
    summary = run_server(grid, cfg, log, on_round=after, runtime=runtime)
    return grid, up, initial, states, summary


def arrays_of(message):
    """Every ArrayRecord of a message, by record name."""
    return {name: from_record(rec) for name, rec in message.content.array_records.items()}


# --- RoLoRA ---------------------------------------------------------------------------------
def test_rolora_changes_only_b_in_odd_and_only_a_in_even_rounds(tiny_models, tmp_path,
                                                                 flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "method=rolora",
                      "lora-init=gaussian", "num-clients=2", "clients-per-round=2", "rounds=2")
    grid, up, initial, states, _ = run_capturing(cfg)
    keys = list(initial)
    assert any(map(is_a, keys)) and any(map(is_b, keys))  # the global state holds both

    def changed(before, after):
        return {k for k in keys if not np.array_equal(before[k], after[k])}

    round1, round2 = changed(initial, states[1]), changed(states[1], states[2])
    assert round1 and all(not is_a(k) for k in round1) and any(map(is_b, round1))
    assert round2 and all(not is_b(k) for k in round2) and any(map(is_a, round2))
    # up: only the round's factor (+ head); down: both factors every round
    assert len(up) == 4
    for i, (_, state) in enumerate(up):
        trained = is_b if i < 2 else is_a
        frozen = is_a if i < 2 else is_b
        assert any(map(trained, state)) and not any(map(frozen, state))
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == 4
    for m in trains:
        sent = arrays_of(m)["arrays"]
        assert set(sent) == set(keys)
    from fedpeft.federation.state import to_record

    def size(keep):  # bytes of an ArrayRecord of those tensors (data + names, shapes, dtypes)
        return to_record({k: v for k, v in initial.items() if keep(k)}).count_bytes()

    for r in read_rounds(cfg.run_dir()):
        uploaded = (lambda k: not is_a(k)) if r["round"] == 1 else (lambda k: not is_b(k))
        assert r["bytes-up"] == 2 * size(uploaded) < r["bytes-down"] == 2 * size(lambda k: True)


def test_rolora_rejects_an_upload_of_the_frozen_factor(tiny_models, tmp_path,
                                                        flower_identity):  # noqa: F811
    """A client that sends A in a B-round is rejected (upload_reference), not averaged."""
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "method=rolora",
                      "num-clients=2", "clients-per-round=2", "rounds=1", "round-retries=0",
                      "max-failed-rounds=0")
    grid = InProcessGrid(2)
    from fedpeft.federation.state import to_record

    def add_a(pid, content):
        state = from_record(content["arrays"])
        rt = Runtime(cfg)
        state.update({k: v for k, v in rt.method.export_state(rt.model).items() if is_a(k)})
        content["arrays"] = to_record(state)
        return content

    grid.tamper = lambda pid, content: add_a(pid, content) if pid == 0 else content
    log, runtime, _ = open_run(cfg)
    run_server(grid, cfg, log, runtime=runtime)
    record = read_rounds(cfg.run_dir())[0]
    assert [r["client"] for r in record["rejected"]] == [0] and record["successes"] == 1


# --- FedSA-LoRA -----------------------------------------------------------------------------
def test_fedsa_b_never_leaves_a_client_and_stays_personal(tiny_models, tmp_path,
                                                          flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "method=fedsa-lora",
                      "num-clients=2", "clients-per-round=2", "rounds=2",
                      "local-test-fraction=0.25")
    grid, up, initial, states, summary = run_capturing(cfg)
    assert not any(map(is_b, initial)) and any(map(is_a, initial))  # the global state: A + head
    kinds = {m.metadata.message_type for m in grid.sent}
    assert {"train", "evaluate"} <= kinds
    for m in grid.sent:  # every message the server sent, every array record in it
        for name, arrays in arrays_of(m).items():
            assert not any(map(is_b, arrays)), (m.metadata.message_type, name)
    assert len(up) == 4 and all(not any(map(is_b, s)) and any(map(is_a, s)) for _, s in up)
    # A and the head changed; each client's own B is on disk, trained, and differs per client
    assert any(not np.array_equal(initial[k], states[2][k]) for k in initial if is_a(k))
    store = ClientStore(cfg.run_dir() / "clients", run_key(cfg.run_dir()))
    assert store.versions(0) == [1, 2] and store.versions(1) == [1, 2]
    b0, b1 = store.load(0, 2), store.load(1, 2)
    assert set(b0) == set(b1) and all(map(is_b, b0))
    assert any(np.abs(v).sum() > 0 for v in b0.values())  # B started at 0 and trained
    assert any(not np.array_equal(b0[k], b1[k]) for k in b0)
    assert not any(np.array_equal(store.load(0, 1)[k], b0[k]) for k in b0)  # B carried on
    assert "personal-accuracy" in summary["final-local"]
    b_params = sum(v.size for v in b0.values())
    assert summary["trainable-params"] == sum(v.size for v in initial.values()) + b_params
    from fedpeft.tracking import round_scalars

    scalars = round_scalars(read_rounds(cfg.run_dir())[-1])
    assert scalars["local/personal-accuracy/worst-10%"] == \
        summary["final-local"]["personal-accuracy"]["worst-10%"]


def test_a_replayed_fedsa_round_trains_exactly_as_the_first_time(tiny_models, tmp_path,
                                                                 flower_identity):  # noqa: F811
    """Round 2's train message delivered again after the round (a retry, or the replay after a
    crash): the client starts from the B it had before round 2, not the one it saved in it."""
    from fedpeft.federation import client_app

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "method=fedsa-lora",
                      "num-clients=2", "clients-per-round=2", "rounds=2")
    grid, up, _, _, _ = run_capturing(cfg)
    last = [m for m in grid.sent if m.metadata.message_type == "train"][-1]
    node = last.metadata.dst_node_id
    first_reply = up[-1][1]
    assert up[-1][0] == node - 100
    again = client_app.app(last, grid.contexts[node])
    replayed = from_record(again.content["arrays"])
    assert all(np.array_equal(replayed[k], first_reply[k]) for k in first_reply)


def test_client_store_versions_replays_and_cleanup(tmp_path):
    store = ClientStore(tmp_path, "run-x")
    assert store.latest_before(3, 5) is None and store.versions(3) == []
    state = {"b": np.ones((2, 2), dtype=np.float32)}
    store.save(3, 1, state, None)
    store.save(3, 4, {"b": 2 * state["b"]}, started_from=1)
    assert store.versions(3) == [1, 4]
    assert store.latest_before(3, 4) == 1  # a replay of round 4 starts from round 1's B again
    assert store.latest_before(3, 5) == 4
    store.save(3, 6, {"b": 3 * state["b"]}, started_from=4)
    assert store.versions(3) == [4, 6]  # older than what round 6 started from: deleted
    np.testing.assert_array_equal(store.load(3, 6)["b"], 3 * state["b"])
    assert not list((tmp_path / "run-x" / "client-3").glob("*.tmp"))
    # the run key is made once per run folder and found again on resume
    key = run_key(tmp_path / "run")
    assert key == run_key(tmp_path / "run") and key.startswith("run-")
    assert run_key(tmp_path / "other") != key


def test_fedsa_resumed_in_process_equals_uninterrupted(tiny_models, tmp_path,
                                                       flower_identity):  # noqa: F811
    """Stopped after round 2 and resumed: the clients' B come back from the store."""
    full, part, expected, resumed = run_stopped_and_resumed(
        tiny_models("bert"), tmp_path, 4, 2, "method=fedsa-lora", "local-test-fraction=0.25",
        "fail-rate=0.3")
    _assert_same_run(tmp_path / "full", tmp_path / "part", expected, resumed)
    def local(run):
        return [(r["round"], r["local-eval"]["values"]) for r in read_rounds(run)]

    assert local(full.run_dir()) == local(part.run_dir())
    assert expected["final-local"] == resumed["final-local"]


KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from flwr.supercore.task_identity import TaskIdentity
for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
    setattr(TaskIdentity, attr, value)
from inprocess import run_inprocess
from fedpeft.config import load_config
run_inprocess(load_config(None, {settings!r}))
"""


@pytest.mark.slow
def test_fedsa_sigkill_then_resume_equals_uninterrupted(tiny_models, tmp_path,
                                                        flower_identity):  # noqa: F811
    """A process running the real round loop and ClientApp (in-process grid: one process serves
    every client, as one simulation worker does) is killed with SIGKILL after a round, then
    resumed: the same final state and metrics, personalised ones included, as a run that was
    never interrupted. The clients' B survive on disk, not in the dead process's memory."""
    settings = ["method=fedsa-lora", "local-test-fraction=0.25", "rounds=5", "fail-rate=0.2"]
    reference = tiny_config(tiny_models("bert"), str(tmp_path / "ref"), *settings)
    summary_ref = run_inprocess(reference)
    killed = tmp_path / "killed"
    cfg_killed = tiny_config(tiny_models("bert"), str(killed), *settings)
    overrides = [f"{k}={v}" for k, v in cfg_killed.to_dict().items()
                 if v is not None and not isinstance(v, list)]
    code = KILLED_RUN.format(tests=os.path.dirname(__file__), settings=overrides)
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (killed / "checkpoint.safetensors").exists() and \
                    (c := _safe_load(killed)) is not None and c.round >= 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended first: {proc.stderr.read()[-2000:]!r}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    at_kill = load_checkpoint(killed).round
    assert 1 <= at_kill < 5 and not (killed / "summary.json").exists()
    assert list((killed / "clients").rglob("round-*.safetensors"))  # B written by the dead run
    from fedpeft.federation.checkpoint import resume_config

    summary_res = run_inprocess(resume_config(killed), resume=True)
    _assert_same_run(tmp_path / "ref", killed, summary_ref, summary_res)
    assert summary_ref["final-local"] == summary_res["final-local"]
    assert [r["local-eval"]["values"] for r in read_rounds(reference.run_dir())] == \
        [r["local-eval"]["values"] for r in read_rounds(killed)]
    assert summary_res["resumed-from-round"] == at_kill


# --- payloads, the SVD start, settings --------------------------------------------------------
def test_payload_counts_per_method(tiny_models):
    model = tiny_models("bert")

    def budget(method, *extra):
        cfg = load_config(None, [f"model={model}", f"method={method}", "lora-rank=4",
                                 "rounds=4", "max-train-samples=64", "max-test-samples=32",
                                 *extra])
        return cfg, method_budget(cfg)

    from fedpeft.federation.state import to_record

    cfg, rows = budget("fedlr")
    rt = Runtime(cfg)
    full = rt.method.export_state(rt.model)
    params = {k: v.size for k, v in full.items()}
    a = sum(n for k, n in params.items() if is_a(k))
    assert a == sum(n for k, n in params.items() if is_b(k)) == 4 * 4 * 32  # 4 targets, r=4, d=32

    def size(keep):  # an ArrayRecord of those tensors: data + names, shapes, dtypes
        return to_record({k: v for k, v in full.items() if keep(k)}).count_bytes()

    everything, no_b, no_a = size(lambda k: True), size(lambda k: not is_b(k)), \
        size(lambda k: not is_a(k))
    assert [(r["bytes-up"], r["bytes-down"]) for r in rows] == [(everything, everything)]
    _, rows = budget("fedsa-lora")
    assert [(r["bytes-up"], r["bytes-down"]) for r in rows] == [(no_b, no_b)]
    assert rows[0]["trainable-params"] == sum(params.values())  # B trains, it does not travel
    _, rows = budget("rolora")
    assert [(r["method"], r["bytes-up"], r["bytes-down"]) for r in rows] == [
        ("rolora (odd rounds)", no_a, everything), ("rolora (even rounds)", no_b, everything)]
    assert rows[0]["trainable-params"] == sum(params.values()) - a
    _, rows = budget("fedsa-lora", "lora-init=svd")
    assert rows[0]["anchor-bytes"] == size(lambda k: is_a(k) or is_b(k))  # A0, B0 once


def test_svd_start_gives_b0_as_every_clients_initial_b(tiny_models):
    cfg = load_config(None, [f"model={tiny_models('bert')}", "method=fedsa-lora", "lora-rank=4",
                             "lora-init=svd", "max-train-samples=64", "max-test-samples=32"])
    rt = Runtime(cfg)
    anchor = rt.method.make_anchor(rt.model)
    assert anchor and rt.method.lr == 1e-3  # FeDeRA's default rate with the SVD start
    params = dict(rt.model.named_parameters())
    for p in params.values():  # a client's worker model after training someone else's B
        if p.requires_grad:
            p.data.add_(1.0)
    rt.method.import_state(rt.model, rt.method.export_state(rt.model))
    for key, b0 in anchor.items():
        if is_b(key):
            np.testing.assert_array_equal(params[key].detach().numpy(), b0.numpy())
    rolora = load_config(None, [f"model={tiny_models('bert')}", "method=rolora",
                                "lora-init=svd", "lora-rank=4"])
    assert Runtime(rolora).method.make_anchor(Runtime(rolora).model)


@pytest.mark.parametrize("settings, message", [
    (["method=rolora", "strategy=fedadam"], "strategy=fedadam"),
    (["method=rolora", "dp=client-fixed", "dp-noise-multiplier=1", "dp-clipping-norm=1"],
     "dp=client-fixed"),
    (["method=rolora", "aggregation=exact-lora"], "already exact"),
    (["method=fedsa-lora", "aggregation=exact-lora"], "never sends B"),
    (["method=fedlr", "lora-init=svd"], "lora-init=svd applies to method=fedsa-lora"),
    (["method=fedsa-lora", "lora-init=pissa"], "lora-init must be gaussian or svd"),
    (["method=fedsa-lora", "lora-dora=true"], "lora-dora"),
])
def test_refused_combinations(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, settings)


def test_allowed_combinations():
    load_config(None, ["method=rolora", "strategy=fedprox", "proximal-mu=0.01"])
    load_config(None, ["method=fedsa-lora", "strategy=fedadam", "lora-init=svd"])
    load_config(None, ["method=fedsa-lora", "dp=server-fixed", "dp-noise-multiplier=0.1",
                       "dp-clipping-norm=1"])


@pytest.mark.parametrize("method, strategy", [
    ("rolora", ["strategy=fedprox", "proximal-mu=0.01"]), ("rolora", ["strategy=fedmedian"]),
    ("fedsa-lora", ["strategy=fedadam", "server-lr=0.01"]),
    ("fedsa-lora", ["dp=server-fixed", "dp-noise-multiplier=0.1", "dp-clipping-norm=1"])])
def test_strategies_that_work_with_them(tiny_models, tmp_path, method, strategy,
                                        flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), f"method={method}",
                      "rounds=2", *strategy)
    _, _, initial, states, summary = run_capturing(cfg)
    assert not summary["rejected"] and summary["skipped-rounds"] == 0
    assert states[2].keys() == initial.keys()
    if method == "rolora":  # the frozen factor is kept exactly whatever the strategy
        assert all(np.array_equal(initial[k], states[1][k]) for k in initial if is_a(k))
        assert all(np.array_equal(states[1][k], states[2][k]) for k in initial if is_b(k))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["fedsa-lora", "rolora"])
def test_two_rounds_on_every_tiny_architecture(tiny_models, tmp_path, arch, method,
                                               flower_identity):  # noqa: F811
    init = "lora-init=svd" if arch in ("roberta", "distilbert") else "lora-init=gaussian"
    cfg = tiny_config(tiny_models(arch), str(tmp_path / "run"), f"method={method}", init,
                      "local-test-fraction=0.25", "local-eval-clients=2")
    summary = run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert [r["successes"] for r in rounds] == [2, 2] and not summary["rejected"]
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    assert all(np.all(np.isfinite(v)) for v in final.values())
    assert any(map(is_b, final)) == (method == "rolora")
    local = rounds[-1]["local-eval"]
    assert len(local["clients"]) == 2 and ("personal-accuracy" in local["values"]) == \
        (method == "fedsa-lora")
