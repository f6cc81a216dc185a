"""The deployment's parts that need no SuperLink, run in-process (seconds): the packed wire
format, Flower's shortened waits, a node's own data files (--node-config train-file), nodes
that are missing at the start, join late or are replaced after a failure."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from inprocess import InProcessGrid, flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft.errors import FedpeftError
from fedpeft.federation import exchange, latency, state
from fedpeft.federation.nodedata import NodeConfigError, node_settings
from fedpeft.federation.validation import check_own_weight
from fedpeft.runlog import load_state, read_rounds

# --- packed wire format -------------------------------------------------------------------------


def test_pack_round_trips_every_dtype_and_shape():
    rng = np.random.default_rng(0)
    original = {"a": rng.random((3, 4), dtype=np.float32), "b": np.arange(7, dtype=np.int16),
                "scalar": np.array(2.5, dtype=np.float64), "empty": np.zeros((0, 5), np.float32),
                "f16": rng.random(5).astype(np.float16), "t": rng.random((2, 3, 4)).T}
    back = state.unpack(state.pack(original))
    assert list(back) == list(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert np.array_equal(back[key], value)
        assert back[key].flags.writeable
    record = state.wire_record(original, packed=True)
    assert state.is_packed(record) and list(record.keys()) == [state.PACKED_KEY]
    assert state.from_record(record).keys() == original.keys()
    assert not state.is_packed(state.wire_record(original, packed=False))


def test_a_packed_run_is_the_same_run(tiny_models, tmp_path, flower_identity,  # noqa: F811
                                      monkeypatch):
    results = {}
    for packed in (False, True):
        monkeypatch.setitem(state._WIRE, "packed", packed)
        cfg = tiny_config(tiny_models("bert"), str(tmp_path / f"run-{packed}"))
        grid = InProcessGrid(cfg.num_clients)
        run_inprocess(cfg, grid)
        trains = [m for m in grid.sent if m.metadata.message_type == "train"]
        assert all(state.is_packed(m.content["arrays"]) == packed for m in trains)
        results[packed] = (load_state(cfg.run_dir() / "final_state.safetensors"),
                           [r["train-loss"] for r in read_rounds(cfg.run_dir())])
    (plain, plain_loss), (packed, packed_loss) = results[False], results[True]
    assert plain_loss == packed_loss
    assert all(np.array_equal(plain[k], packed[k]) for k in plain)


# --- Flower's waits ------------------------------------------------------------------------------


def test_the_supernode_clock_caps_only_flowers_idle_sleeps(monkeypatch):
    slept = []
    monkeypatch.setattr(latency.time, "sleep", slept.append)
    clock = latency.PollClock(0.2)
    for seconds in (3, 0.5, 1.0, 0.01):
        clock.sleep(seconds)
    assert slept == [0.2, 0.2, 1.0, 0.01]
    assert clock.monotonic is latency.time.monotonic  # everything else is the time module


def test_wait_settings_are_checked_in_one_line():
    assert latency.seconds_setting("X", 0.2, 0.01, 3, {}) == 0.2
    assert latency.seconds_setting("X", 0.2, 0.01, 3, {"X": "0.5"}) == 0.5
    for bad in ("fast", "0", "10", "nan"):
        with pytest.raises(FedpeftError, match=r"X='.*': expected seconds between 0.01 and 3"):
            latency.seconds_setting("X", 0.2, 0.01, 3, {"X": bad})


def test_shorter_object_pulls(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils as objects

    for function in (objects.pull_objects, objects.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(function, "__kwdefaults__", dict(function.__kwdefaults__))
    assert objects.pull_objects.__kwdefaults__["initial_backoff"] == 1  # Flower's
    assert latency.shorten_pulls(0.05) == 0.05
    for function in (objects.pull_objects, objects.pull_and_inflate_object_from_tree):
        assert function.__kwdefaults__["initial_backoff"] == 0.05
        assert function.__kwdefaults__["backoff_cap"] == 1.0
        assert function.__kwdefaults__["max_tries_per_object"] == 5000
        assert function.__kwdefaults__["max_time"] == latency.DEFAULT_MAX_TIME
    monkeypatch.setenv("FEDPEFT_PULL_MAX_TIME", "20")
    latency.shorten_pulls()
    assert objects.pull_objects.__kwdefaults__["max_time"] == 20.0
    monkeypatch.setenv("FEDPEFT_PULL_MAX_TIME", "0")
    with pytest.raises(FedpeftError, match="FEDPEFT_PULL_MAX_TIME='0': expected seconds"):
        latency.shorten_pulls()


# --- a node's own settings -----------------------------------------------------------------------


def test_node_config_is_validated_with_one_line_errors(tmp_path):
    ok = node_settings({"partition-id": 1, "num-partitions": 3, "threads": 2})
    assert (ok.threads, ok.own_data) == (2, False)
    own = node_settings({"partition-id": 0, "train-file": str(tmp_path / "x.csv")})
    assert own.own_data and own.train_file.endswith("x.csv")
    cases = [({"partition-id": 0, "train_file": "/x"}, r"keys \['train_file'\] are not"),
             ({"partition-id": 0, "threads": -1}, "threads=-1: expected a whole number"),
             ({"partition-id": 0, "threads": "two"}, "threads='two'"),
             ({"partition-id": 0, "train-file": "data/x.csv"}, "give an absolute path"),
             ({"partition-id": 0, "train-file": "/a.csv", "data-dir": "/b"}, "both train-file")]
    for config, message in cases:
        with pytest.raises(NodeConfigError, match=message):
            node_settings(config)


def test_own_weights_must_be_whole_and_stay_the_same():
    assert check_own_weight(17.0, None) is None
    assert check_own_weight(17.0, 17) is None
    assert "whole number >= 1" in check_own_weight(0.0, None)
    assert "whole number >= 1" in check_own_weight(2.5, None)
    assert "reported 17 in its first update" in check_own_weight(18.0, 17)


def _csv(path, rows):
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def text_files(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "night"]

    def rows(n, labels):
        return [(" ".join(rng.choice(words, 6)), labels[i % len(labels)]) for i in range(n)]

    return {"train": _csv(tmp_path / "server-train.csv", rows(40, ["a", "b", "c"])),
            "test": _csv(tmp_path / "server-test.csv", rows(12, ["a", "b", "c"])),
            "node": _csv(tmp_path / "node1-own.csv", rows(23, ["b", "a"])),
            "bad": _csv(tmp_path / "node1-bad.csv", rows(9, ["a", "zebra"]))}


def test_a_node_trains_on_its_own_file_which_the_server_never_opens(
        tiny_models, tmp_path, text_files, flower_identity):  # noqa: F811
    import inspect
    import sys

    node_file = text_files["node"]
    openers = []

    def audit(event, args):  # who opens the node's file: must be the ClientApp only
        if event == "open" and str(args[0]) == node_file:
            openers.append({f.filename.rsplit("/", 1)[-1] for f in inspect.stack()[1:]})

    sys.addaudithook(audit)
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "task=text-files",
                      f"train-file={text_files['train']}", f"test-file={text_files['test']}",
                      "num-clients=3", "clients-per-round=3", "max-train-samples=10000")
    grid = InProcessGrid(3)
    grid.contexts[101].node_config["train-file"] = node_file
    sent = {}

    def record(pid, content):
        sent.setdefault(pid, []).append(float(content["metrics"]["num-examples"]))
        return content

    grid.tamper = record
    run_inprocess(cfg, grid)
    rounds = read_rounds(cfg.run_dir())
    assert all(r["successes"] == 3 and not r["rejected"] for r in rounds)
    assert sent[1] == [23.0, 23.0]  # its whole file, not a shard of the server's 40 rows
    # every open of the node's file is the ClientApp's (in-process, the server's loop is
    # further up the same stack, since this grid calls the client directly)
    assert openers and all("client_app.py" in stack for stack in openers)
    assert node_file not in (cfg.run_dir() / "config.toml").read_text()


def test_a_node_file_with_foreign_labels_fails_that_client_in_one_line(
        tiny_models, tmp_path, text_files, flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "task=text-files",
                      f"train-file={text_files['train']}", f"test-file={text_files['test']}",
                      "num-clients=2", "clients-per-round=2", "max-train-samples=10000", "rounds=1")
    grid = InProcessGrid(2)
    grid.contexts[101].node_config["train-file"] = text_files["bad"]
    run_inprocess(cfg, grid)
    (record,) = read_rounds(cfg.run_dir())
    assert record["successes"] == 1 and [f["client"] for f in record["failures"]] == [1]
    reason = record["failures"][0]["reason"]
    assert text_files["bad"] in reason and "labels ['zebra'] are not in the run's label set" \
        in reason


def test_a_node_whose_weight_changes_is_rejected(tiny_models, tmp_path, text_files,
                                                 flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "task=text-files",
                      f"train-file={text_files['train']}", f"test-file={text_files['test']}",
                      "num-clients=2", "clients-per-round=2", "max-train-samples=10000")
    grid = InProcessGrid(2)
    grid.contexts[101].node_config["train-file"] = text_files["node"]
    calls = {"n": 0}

    def inflate(pid, content):
        calls["n"] += 1
        if pid == 1 and calls["n"] > 2:  # round 2: node 1 claims more examples
            content["metrics"]["num-examples"] = 1000
        return content

    grid.tamper = inflate
    run_inprocess(cfg, grid)
    first, second = read_rounds(cfg.run_dir())
    assert first["successes"] == 2 and not first["rejected"]
    assert [r["client"] for r in second["rejected"]] == [1]
    assert "may not change during a run" in second["rejected"][0]["reason"]


def test_a_node_config_train_file_needs_a_files_task(tiny_models, tmp_path,
                                                     flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "num-clients=2",
                      "clients-per-round=2", "rounds=1")
    grid = InProcessGrid(2)
    grid.contexts[101].node_config["train-file"] = str(tmp_path / "own.csv")
    run_inprocess(cfg, grid)
    (record,) = read_rounds(cfg.run_dir())
    assert "task=semeval reads a built-in dataset; give this node data-dir" in \
        record["failures"][0]["reason"]


# --- nodes that are missing, join late, or are replaced ------------------------------------------


def test_a_run_starts_without_a_missing_node_and_uses_it_once_it_joins(
        tiny_models, tmp_path, flower_identity, monkeypatch):  # noqa: F811
    monkeypatch.setitem(exchange.DISCOVERY, "partial", True)
    monkeypatch.setitem(exchange.DISCOVERY, "timeout", 0.0)
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "num-clients=3",
                      "clients-per-round=3", "rounds=2", "min-train-clients=1")
    grid = InProcessGrid(3)
    grid.gone.add(102)

    def join_after_round_1(pid, content):
        grid.gone.discard(102)
        return content

    grid.tamper = join_after_round_1
    run_inprocess(cfg, grid)
    first, second = read_rounds(cfg.run_dir())
    assert first["successes"] == 2 and [f["kind"] for f in first["failures"]] == ["no-node"]
    assert any("no node holds partitions [2]" in n for n in first["nodes"])
    assert any("partition 2: node 102 joined" in n for n in second["nodes"])
    assert second["successes"] == 3 and not second["failures"]


def test_a_strict_start_still_needs_every_partition(tiny_models, tmp_path,
                                                    flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "num-clients=3",
                      "clients-per-round=3")
    grid = InProcessGrid(3)
    grid.gone.add(102)
    assert cfg.num_clients == 3
    with pytest.raises(exchange.FederationError, match=r"only 2 of num-clients=3 nodes"):
        exchange.discover_nodes(grid, 3, timeout=0.0)


def test_a_restarted_node_replaces_the_one_that_failed(tiny_models, tmp_path,
                                                       flower_identity):  # noqa: F811
    from flwr.app import Context, RecordDict

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "num-clients=2",
                      "clients-per-round=2", "rounds=2", "min-train-clients=1",
                      "round-timeout=1")
    grid = InProcessGrid(2)
    grid.silent.add(101)  # hangs in round 1, and stays listed (its heartbeats have not expired)

    def restart_node_1(pid, content):
        grid.contexts.setdefault(201, Context(run_id=1, node_id=201, node_config={
            "partition-id": 1, "num-partitions": 2}, state=RecordDict(), run_config={}))
        return content

    grid.tamper = restart_node_1
    run_inprocess(cfg, grid)
    first, second = read_rounds(cfg.run_dir())
    assert [f["kind"] for f in first["failures"]] == ["timeout"]
    assert any("partition 1: node 201 replaces node 101" in n for n in second["nodes"])
    assert second["successes"] == 2 and not second["failures"]


def test_size_weighted_sampling_is_refused_with_nodes_that_bring_their_own_data(
        tiny_models, tmp_path, text_files, flower_identity):  # noqa: F811
    from fedpeft.config import ConfigError

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "task=text-files",
                      f"train-file={text_files['train']}", f"test-file={text_files['test']}",
                      "num-clients=2", "clients-per-round=1", "client-sampling=size")
    grid = InProcessGrid(2)
    grid.contexts[101].node_config["train-file"] = text_files["node"]
    with pytest.raises(ConfigError, match=r"partitions \[1\] train on their own files"):
        run_inprocess(cfg, grid)
