"""The federated-LoRA methods of 2024-26 (flora, flexlora, fedex-lora, hetlora) in federated runs:
what travels (bytes down include the merged base), two federated rounds on every tiny
architecture, a resumed hetlora run and a SIGKILLed flora run equal to uninterrupted ones, and
the merged export. Their rules on hand-made cases: test_lora_family.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess import (  # noqa: F401
    flower_identity,
    run_inprocess,
    run_stopped_and_resumed,
    tiny_config,
)

from fedpeft.config import load_config
from fedpeft.federation.state import to_record
from fedpeft.methods.lora_family import MERGED, truncate
from fedpeft.runlog import load_state, read_rounds

RUNS = {"flora": ["client-ranks=2,4"], "flexlora": ["client-ranks=2,4"],
        "fedex-lora": [], "hetlora": ["client-ranks=2,4", "hetlora-lambda=0.5"]}


def _expected_down(method, cfg, initial, clients):
    """What the server must count down in round 1: each sampled client's payload."""
    return sum(to_record(method.client_payload(initial, pid, 1)).count_bytes()
               for pid in clients)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta-v2", "distilbert"])
@pytest.mark.parametrize("method", list(RUNS))
def test_two_federated_rounds(tiny_models, tmp_path, method, arch, flower_identity):  # noqa: F811
    from fedpeft.federation.runtime import Runtime

    cfg = tiny_config(tiny_models(arch), str(tmp_path / "run"), f"method={method}",
                      "num-clients=4", "clients-per-round=3", *RUNS[method])
    start = Runtime(cfg)
    initial = start.method.export_state(start.model)
    summary = run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["successes"] == 3 and not r["rejected"] and not r["failures"] for r in rounds)
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    assert all(np.all(np.isfinite(v)) for v in final.values())
    moved = [k for k in final if k in initial and final[k].shape == initial[k].shape
             and not np.array_equal(final[k], initial[k])]
    assert moved
    assert rounds[0]["bytes-down"] == _expected_down(start.method, cfg, initial,
                                                     rounds[0]["clients"])
    merged = {k: v for k, v in final.items() if k.startswith(MERGED)}
    if method in ("flora", "fedex-lora"):  # the base moved, and the clients were sent it
        assert merged and any(np.any(v != 0) for v in merged.values())
        assert rounds[1]["bytes-down"] > rounds[0]["bytes-down"] or method == "fedex-lora"
    else:
        assert not merged
    if cfg.client_ranks:
        by_rank = rounds[0]["bytes-by-rank"]
        assert sum(r["bytes-down"] for r in by_rank.values()) == rounds[0]["bytes-down"]
        assert sum(r["bytes-up"] for r in by_rank.values()) == rounds[0]["bytes-up"]
        if method != "flora":  # rank-2 clients receive less than rank-4 ones
            per_client = {int(k): v["bytes-down"] / v["clients"] for k, v in by_rank.items()}
            assert per_client.get(2, 0) < per_client.get(4, float("inf"))
    assert summary["final"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedex-lora", "flexlora"])
def test_svd_start_runs_two_rounds(tiny_models, tmp_path, method, flower_identity):  # noqa: F811
    """lora-init=svd: FeDeRA's anchor (sent once per client) and residual under either rule."""
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), f"method={method}",
                      "lora-init=svd")
    summary = run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert all(r["successes"] == 2 and not r["rejected"] for r in rounds)
    assert summary["anchor-params"] > 0
    assert rounds[0]["bytes-down"] > rounds[1]["bytes-down"]  # the anchor went with round 1


def test_budget_rows_per_rank_count_what_travels(tiny_models):
    from fedpeft.budget import for_method, method_budget

    cfg = load_config(None, [f"model={tiny_models('bert')}", "method=flexlora", "lora-rank=4",
                             "client-ranks=2,4", "num-clients=4", "clients-per-round=2"])
    flex = method_budget(cfg)
    assert [r["method"] for r in flex] == ["flexlora (r=2)", "flexlora (r=4)"]
    # 2 layers x query/value x r x (32 + 32) fewer values per component
    assert flex[1]["trainable-params"] - flex[0]["trainable-params"] == 4 * 2 * 64
    assert all(r["bytes-down"] == r["bytes-up"] for r in flex)
    fedex = method_budget(for_method(cfg, "fedex-lora"))
    assert [r["method"] for r in fedex] == ["fedex-lora"]  # client-ranks dropped for it
    assert fedex[0]["bytes-down"] - fedex[0]["bytes-up"] >= 4 * 32 * 32 * 4  # the dense fold
    flora = method_budget(for_method(cfg, "flora"))
    assert [r["rank"] for r in flora] == [2, 4] and flora[0]["bytes-up"] < flora[1]["bytes-up"]
    assert flora[0]["bytes-down"] == flora[1]["bytes-down"] >= 4 * 32 * 32 * 4


def test_fedex_bytes_down_include_the_folded_residual(tiny_models, tmp_path,
                                                      flower_identity):  # noqa: F811
    """The merged base is counted: a fedex-lora client receives the LoRA state plus one dense
    (d_out, d_in) float32 matrix per target (tiny BERT: 2 layers x query/value, 32 x 32)."""
    lora = tiny_config(tiny_models("bert"), str(tmp_path / "fedlr"), "method=fedlr",
                       "rounds=1")
    fedex = tiny_config(tiny_models("bert"), str(tmp_path / "fedex"), "method=fedex-lora",
                        "rounds=1")
    run_inprocess(lora)
    run_inprocess(fedex)
    plain, folded = read_rounds(lora.run_dir())[0], read_rounds(fedex.run_dir())[0]
    assert folded["bytes-up"] == plain["bytes-up"]
    extra = (folded["bytes-down"] - plain["bytes-down"]) / 2  # 2 clients
    assert extra >= 4 * 32 * 32 * 4  # 4 targets, dense float32 (plus Flower's metadata)
    assert extra < 4 * 32 * 32 * 4 * 1.1


def test_hetlora_resumed_run_equals_uninterrupted(tiny_models, tmp_path,
                                                   flower_identity):  # noqa: F811
    """The pruned ranks are server state: checkpointed, so a resume truncates as before."""
    full, part, expected, resumed = run_stopped_and_resumed(
        tiny_models("bert"), tmp_path, 3, 2, "method=hetlora", "client-ranks=2,4",
        "hetlora-lambda=0.5")
    a = load_state(full.run_dir() / "final_state.safetensors")
    b = load_state(part.run_dir() / "final_state.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert expected["final"] == resumed["final"]
    states = [r.get("method-state") for r in read_rounds(full.run_dir())]
    assert any(s and s.get("ranks") for s in states)  # some client did prune


_KILLABLE = """
import sys
sys.path.insert(0, {tests!r})
import conftest  # noqa: F401  (loopback-only environment)
from flwr.supercore.task_identity import TaskIdentity
for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
    setattr(TaskIdentity, attr, value)
from inprocess import run_inprocess, tiny_config
run_inprocess(tiny_config(*{args!r}))
"""


@pytest.mark.slow
def test_flora_sigkill_then_resume_equals_uninterrupted(tiny_models, tmp_path,
                                                        flower_identity):  # noqa: F811
    """A flora run (the in-process grid, in its own process) killed with SIGKILL once round 1
    is checkpointed, then resumed: the same final state (head and the merged base, which passes
    from factored to dense on the way) and metrics as an uninterrupted run."""
    from fedpeft.federation.checkpoint import load_checkpoint, resume_config

    tests = str(Path(__file__).parent)
    settings = ["method=flora", "client-ranks=2,4", "rounds=4", "fail-rate=0.2",
                "max-train-samples=160"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    args = (tiny_models("bert"), str(killed), *settings)
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE.format(tests=tests, args=args)],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                c = load_checkpoint(killed)
            except Exception:  # caught mid-write: look again
                c = None
            if c is not None and c.round >= 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    at_kill = load_checkpoint(killed).round
    assert 1 <= at_kill < 4 and not (killed / "summary.json").exists()
    expected = run_inprocess(tiny_config(tiny_models("bert"), str(ref), *settings))
    resumed = run_inprocess(resume_config(killed), resume=True)
    a = load_state(ref / "final_state.safetensors")
    b = load_state(killed / "final_state.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(k.startswith(MERGED) and not k.endswith(("/A", "/B")) for k in a)  # dense now
    assert expected["final"] == resumed["final"] and resumed["resumed-from-round"] == at_kill
    ra, rb = read_rounds(ref), read_rounds(killed)
    assert [(r["clients"], r["train-loss"], r["bytes-down"], r.get("method-state"))
            for r in ra] == [(r["clients"], r["train-loss"], r["bytes-down"],
                              r.get("method-state")) for r in rb]
    assert ra[0]["method-state"]["merged-rank"] != "dense"  # factored after round 1


def test_flora_clients_train_on_exactly_the_servers_base(tiny_models, tmp_path,
                                                         flower_identity):  # noqa: F811
    """After 2 merges, a client that never took part builds its base from the payload: equal,
    bit for bit, to the server's frozen weights."""
    from fedpeft.federation.runtime import Runtime
    from fedpeft.methods.lora import lora_layers

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "method=flora",
                      "client-ranks=2,4", "num-clients=4", "clients-per-round=2")
    run_inprocess(cfg)
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    server, client = Runtime(cfg), Runtime(cfg)
    server.method.import_state(server.model, final)
    client.method.configure_client(client, {"round": 3})
    client.method.receive(client, client.method.client_payload(final, 3, 3), 3)
    for name, layer in lora_layers(server.model).items():
        w_server = layer.get_base_layer().weight
        w_client = lora_layers(client.model)[name].get_base_layer().weight
        assert torch.equal(w_server, w_client)
        assert not torch.equal(w_server, layer._fedpeft_w0)  # the base did move
    truncated = truncate(final, 2)
    assert truncated.keys() == final.keys()


def test_export_merged_carries_the_merged_base_and_peft_is_refused(tiny_models, tmp_path,
                                                                   flower_identity):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    from fedpeft.export import ExportError, export_run, load_run

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "method=flora",
                      "client-ranks=2,4")
    run_inprocess(cfg)
    out = export_run(cfg.run_dir(), "merged", tmp_path / "merged")
    runtime, _ = load_run(cfg.run_dir())
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.randint(1000, 1500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(model(input_ids=ids).logits.numpy(),
                                   runtime.model.eval()(input_ids=ids).logits.numpy(), atol=1e-5)
    with pytest.raises(ExportError, match="folds updates into the frozen weights"):
        export_run(cfg.run_dir(), "peft", tmp_path / "peft")
