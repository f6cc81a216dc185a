"""track=tensorboard / track=mlflow: what a run logs there, read back with each library's own
reader (MLflow's client, TensorBoard's event accumulator), resume, and failures."""

import builtins
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
from inprocess import flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft import tracking
from fedpeft.config import ConfigError, RunConfig, load_config
from fedpeft.federation.checkpoint import resume_config
from fedpeft.runlog import read_rounds
from fedpeft.tracking import (
    MLflowTracker,
    TensorBoardTracker,
    Trackers,
    TrackingWarning,
    config_params,
    default_uri,
    param_value,
    round_scalars,
)

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def mlflow_client(run_dir):
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run-id"]
    return MlflowClient(default_uri(run_dir)), run_id


def tensorboard_scalars(run_dir):
    """{tag: [(step, value), ...]} as TensorBoard reads the event files (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
               for tag in acc.Tags()["scalars"]}
    return scalars, acc


def assert_scalars_match_rounds(scalars, rounds):
    expected = {}
    for record in rounds:
        for tag, value in round_scalars(record).items():
            expected.setdefault(tag, []).append((record["round"], value))
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


# --- settings and what a round logs --------------------------------------------------------------

def test_track_settings_are_checked():
    assert tracking.backends(load_config(None, ["track=tensorboard,mlflow"])) == \
        ["tensorboard", "mlflow"]
    assert tracking.backends(RunConfig()) == []
    assert tracking.open_tracker(RunConfig(), ".").trackers == []  # track=none: nothing opens
    with pytest.raises(ConfigError, match="unknown tracker 'wandb'"):
        load_config(None, ["track=tensorboard,wandb"])
    with pytest.raises(ConfigError, match="none, or tensorboard"):
        load_config(None, ["track=none,mlflow"])
    assert load_config(None, ["track=mlflow", "track-uri="]).track_uri is None  # unset
    with pytest.raises(ConfigError, match="track-uri is empty"):
        RunConfig(track="mlflow", track_uri=" ").validate()  # e.g. track-uri = "" in TOML
    # tracking changes no result: a resume or a reused run may switch it
    from fedpeft.config import non_structural_settings, resumable_settings

    assert {"track", "track-uri", "track-experiment"} <= resumable_settings()
    assert {"track", "track-uri", "track-experiment"} <= non_structural_settings()


def test_round_scalars_and_param_values():
    record = {"round": 3, "clients": [0, 2], "attempts": 1, "successes": 2, "skipped": False,
              "failures": [{"client": 1}], "rejected": [], "train-loss": 1.5,
              "metrics": {"accuracy": 0.25, "valid-accuracy": 0.5},
              "metrics-after-switch": {"accuracy": 0.3}, "bytes-down": 100, "bytes-up": 80,
              "seconds": 2.0, "seconds-train": 1.5, "seconds-eval": None,
              "drift": {"between": "weights", "mean": {"A": {"magnitude": 0.1, "direction": None},
                                                       "B": {"magnitude": 0.2,
                                                             "direction": 0.01}}},
              "privacy": {"epsilon": 4.0, "delta": 1e-5, "releases": 3},
              "method-state": {"stage": 2}}
    assert round_scalars(record) == {
        "accuracy": 0.25, "valid-accuracy": 0.5, "after-switch/accuracy": 0.3, "attempts": 1.0,
        "successes": 2.0, "train-loss": 1.5, "bytes-down": 100.0, "bytes-up": 80.0,
        "seconds": 2.0, "seconds-train": 1.5, "failures": 1.0, "rejected": 0.0,
        "drift/A/magnitude": 0.1, "drift/B/magnitude": 0.2, "drift/B/direction": 0.01,
        "privacy/epsilon": 4.0, "privacy/delta": 1e-5}
    assert round_scalars({"round": 1, "train-loss": math.nan, "metrics": {}})["failures"] == 0
    assert "train-loss" not in round_scalars({"round": 1, "train-loss": math.nan})
    assert param_value("federa") == "federa" and param_value(None) == "null"
    assert json.loads(param_value(["query", "value"])) == ["query", "value"]
    assert json.loads(param_value(0.001)) == 0.001 and param_value(True) == "true"
    long = param_value(["x" * 100] * 100)
    assert len(long) == tracking.MLFLOW_PARAM_MAX and long.endswith("...")


# --- missing libraries, unusable stores, failures while logging ----------------------------------

def test_missing_library_is_a_clear_error(tiny_models, tmp_path, monkeypatch,
                                          flower_identity):  # noqa: F811
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a))
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "track=tensorboard,mlflow")
    with pytest.raises(ConfigError, match=r"mlflow is not installed.*\[track\]"):
        run_inprocess(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    monkeypatch.undo()

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="cannot import TensorBoard's writer"):
        TensorBoardTracker().start(cfg, tmp_path / "tb")
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (
        (_ for _ in ()).throw(ImportError("No module named 'mlflow'"))
        if name.startswith("mlflow") else real_import(name, *a, **k)))
    with pytest.raises(ConfigError, match="cannot import MLflow"):
        MLflowTracker().start(cfg, tmp_path / "ml")


def test_unusable_tracking_uri_is_a_clear_error(tmp_path):
    cfg = load_config(None, ["track=mlflow", "track-uri=nosuchscheme://host/x",
                             f"out={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="track=mlflow: cannot use track-uri=nosuchscheme"):
        tracking.open_tracker(cfg, tmp_path / "run")


def test_a_failing_tracker_warns_once_and_the_run_goes_on():
    calls = []

    class Broken:
        name = "broken"

        def log_round(self, record):
            calls.append(record["round"])
            raise OSError("disk full")

        def finish(self, summary, run_dir):
            calls.append("finish")

    class Fine:
        name = "fine"

        def log_round(self, record):
            calls.append(("fine", record["round"]))

        def finish(self, summary, run_dir):
            calls.append(("fine", "finish"))

    trackers = Trackers([Broken(), Fine()])
    with pytest.warns(TrackingWarning, match="track=broken: logging failed.*disk full"):
        trackers.log_round({"round": 1})
    trackers.log_round({"round": 2})
    trackers.finish({}, ".")
    assert calls == [1, ("fine", 1), ("fine", 2), ("fine", "finish")]


# --- resume bookkeeping, without a federation ----------------------------------------------------

def _record(step, accuracy):
    return {"round": step, "train-loss": 1.0 / step, "metrics": {"accuracy": accuracy},
            "bytes-down": 10 * step, "bytes-up": 5, "seconds": 0.5, "failures": [],
            "rejected": []}


def test_tensorboard_purges_rounds_past_the_checkpoint(tmp_path):
    cfg = RunConfig(out=str(tmp_path))
    first = TensorBoardTracker()
    first.start(cfg, tmp_path)
    for step in (1, 2, 3):
        first.log_round(_record(step, step / 10))
    first.close()  # killed: round 3 was logged but the checkpoint holds rounds 1-2
    history = [_record(1, 0.1), _record(2, 0.2)]
    again = TensorBoardTracker()
    again.start(cfg, tmp_path, history)
    again.log_round(_record(3, 0.7))  # round 3 once more, differently
    again.finish({"metric": "accuracy", "final": {"accuracy": 0.7}}, tmp_path)
    scalars, acc = tensorboard_scalars(tmp_path)
    assert_scalars_match_rounds(scalars, [*history, _record(3, 0.7)])
    assert "config/text_summary" in acc.Tags()["tensors"]

    # events lost before a flush (no tracking.json round): the history is written again
    (tmp_path / "tracking.json").unlink()
    fresh = TensorBoardTracker()
    fresh.start(cfg, tmp_path, [*history, _record(3, 0.7)])
    fresh.close()
    scalars, _ = tensorboard_scalars(tmp_path)
    assert_scalars_match_rounds(scalars, [*history, _record(3, 0.7)])


def test_mlflow_backfills_the_rounds_it_missed(tmp_path):
    """A run resumed with track=mlflow switched on (or after MLflow failed mid-run) logs the
    history's rounds it lacks, each once, in the same MLflow run."""
    cfg = load_config(None, ["track=mlflow", f"track-uri={(tmp_path / 'mlruns').as_uri()}",
                             "track-experiment=backfill", f"out={tmp_path / 'run'}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = MLflowTracker()
    first.start(cfg, run_dir, [_record(1, 0.1)])
    first.log_round(_record(2, 0.2))
    again = MLflowTracker()
    again.start(dataclasses.replace(cfg, rounds=30), run_dir,
                [_record(s, s / 10) for s in (1, 2, 3)])
    assert again.run_id == first.run_id
    history = again.client.get_metric_history(again.run_id, "accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    run = again.client.get_run(again.run_id)
    assert run.data.params["rounds"] == "20" and run.data.tags["resumed.rounds"] == "30"
    assert run.info.experiment_id == again.client.get_experiment_by_name("backfill").experiment_id


# --- a real (in-process) federated run, read back ------------------------------------------------

def test_tracked_run_reads_back_in_mlflow_and_tensorboard(tiny_models, tmp_path,
                                                          flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "track=tensorboard,mlflow",
                      "rounds=3", "eval-every=2")
    summary = run_inprocess(cfg)
    run_dir = cfg.run_dir()
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds if r["metrics"]] == [2, 3]

    client, run_id = mlflow_client(run_dir)
    run = client.get_run(run_id)
    saved = load_config(run_dir / "config.toml")
    assert run.data.params == config_params(saved)
    for key, value in saved.to_dict().items():  # and each reads back as the setting
        param = run.data.params[key]
        assert (param if isinstance(value, str) else json.loads(param)) == value, key
    assert {k: run.data.tags[k] for k in ("method", "task", "model")} == \
        {"method": "federa", "task": "semeval", "model": cfg.model}
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "semeval"
    accuracy = client.get_metric_history(run_id, "accuracy")
    assert [(m.step, m.value) for m in accuracy] == \
        [(r["round"], r["metrics"]["accuracy"]) for r in rounds if r["metrics"]]
    assert accuracy[-1].value == summary["final"]["accuracy"]
    for name in ("train-loss", "bytes-down", "bytes-up", "seconds", "seconds-train",
                 "seconds-eval", "drift/A/magnitude", "drift/B/direction"):
        history = client.get_metric_history(run_id, name)
        assert [(m.step, m.value) for m in history] == \
            [(r["round"], round_scalars(r)[name]) for r in rounds], name
    artifacts = {a.path: a for a in client.list_artifacts(run_id)}
    assert {"final_state.safetensors", "summary.json", "rounds.jsonl", "peft-adapter"} <= \
        set(artifacts)
    from fedpeft.report_model import find_runs

    assert [r.path for r in find_runs([tmp_path])] == [run_dir]  # artifacts are no second run
    assert artifacts["final_state.safetensors"].file_size == \
        (run_dir / "final_state.safetensors").stat().st_size
    adapter = {a.path for a in client.list_artifacts(run_id, "peft-adapter")}
    assert {"peft-adapter/adapter_config.json", "peft-adapter/adapter_model.safetensors"} <= \
        adapter
    local = client.download_artifacts(run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == \
        json.loads((run_dir / "summary.json").read_text())

    scalars, acc = tensorboard_scalars(run_dir)
    assert_scalars_match_rounds(scalars, rounds)
    assert {"config/text_summary", "summary/text_summary"} <= set(acc.Tags()["tensors"])
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "track = \"tensorboard,mlflow\"" in config_text


def test_resumed_run_continues_the_same_mlflow_run(tiny_models, tmp_path,
                                                   flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "track=tensorboard,mlflow",
                      "rounds=1", "method=fedlr")
    run_inprocess(cfg)
    run_dir = cfg.run_dir()
    client, first_id = mlflow_client(run_dir)
    assert client.get_run(first_id).info.status == "FINISHED"
    run_inprocess(resume_config(run_dir, ["rounds=2"]), resume=True)
    client, run_id = mlflow_client(run_dir)
    assert run_id == first_id
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    rounds = read_rounds(run_dir)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "accuracy")] == \
        [(r["round"], r["metrics"]["accuracy"]) for r in rounds]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["rounds"] == "1" and run.data.tags["resumed.rounds"] == "2"
    scalars, _ = tensorboard_scalars(run_dir)
    assert_scalars_match_rounds(scalars, rounds)
