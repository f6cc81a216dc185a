"""No silent reuse, no silent failure: the paths by which a wrong table or a broken run could pass
as a good one.

- a comparison or ``--resume`` reuses a run only if it was made with the same settings;
- SLoRA's stage switch is resolved once, so extending a run cannot move it;
- a run whose clients all fail stops with their error and a non-zero exit;
- settings that cannot work are refused before training;
- a node with other pretrained weights refuses to train;
- SLoRA's switch round logs the model it trained, the switched one beside it;
- the Hugging Face hub is the user's to switch off.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess import flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft.compare import plan, run_jobs
from fedpeft.config import ConfigError, RunConfig, load_config
from fedpeft.errors import RunFailedError
from fedpeft.federation import runtime as runtime_module
from fedpeft.federation.checkpoint import resume_config
from fedpeft.runlog import read_rounds


def _inprocess_simulate(cfg: RunConfig, resume: bool = False) -> dict:
    return run_inprocess(cfg, resume=resume, overwrite=not resume)


# --- item 2: compare and --resume reuse only the same run -----------------------------------

def test_compare_refuses_a_finished_run_made_with_other_settings(tiny_models, tmp_path,
                                                                 flower_identity):  # noqa: F811
    base = tiny_config(tiny_models("bert"), str(tmp_path / "unused"), "rounds=1", "lora-rank=2")
    root = str(tmp_path / "cmp")
    first = run_jobs(plan(base, ["fedlr"], {}, {}, [0], root), _inprocess_simulate,
                     log=lambda _: None)
    assert first[0]["rounds"] == 1
    other = load_config(None, ["lora-rank=4"], base=base)
    jobs = plan(other, ["fedlr"], {}, {}, [0], root)  # same folder name: fedlr-s0
    folder = jobs[0].cfg.run_dir()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ConfigError, match=r"lora-rank: 2 -> 4"):
        run_jobs(jobs, _inprocess_simulate, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing touched
    # the same settings are reused as they are, not redone
    again = run_jobs(plan(base, ["fedlr"], {}, {}, [0], root), _inprocess_simulate,
                     log=lambda _: None)
    assert again[0]["final"] == first[0]["final"]


def test_compare_refuses_a_run_longer_than_asked(tiny_models, tmp_path,
                                                 flower_identity):  # noqa: F811
    base = tiny_config(tiny_models("bert"), str(tmp_path / "unused"), "rounds=2", "lora-rank=2")
    root = str(tmp_path / "cmp")
    run_jobs(plan(base, ["fedlr"], {}, {}, [0], root), _inprocess_simulate, log=lambda _: None)
    shorter = load_config(None, ["rounds=1"], base=base)
    with pytest.raises(ConfigError, match="already finished round 2"):
        run_jobs(plan(shorter, ["fedlr"], {}, {}, [0], root), _inprocess_simulate,
                 log=lambda _: None)


def test_compare_checks_every_folder_before_training_any(tmp_path):
    calls = []
    jobs = plan(RunConfig(rounds=2), ["fedlr", "federa"], {}, {}, [0], str(tmp_path))
    stray = jobs[1].cfg.run_dir()
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no fedpeft run"):
        run_jobs(jobs, lambda cfg, resume=False: calls.append(cfg), log=lambda _: None)
    assert calls == [] and (stray / "notes.txt").read_text() == "mine"


def test_resume_refuses_settings_that_change_results(tiny_models, tmp_path,
                                                     flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=1")
    run_inprocess(cfg)
    for change in ("max-update-norm=5", "fail-rate=0.5", "lora-rank=2", "batch-size=8"):
        key = change.partition("=")[0]
        with pytest.raises(ConfigError, match=rf"{key}: "):
            run_inprocess(resume_config(cfg.run_dir(), ["rounds=2", change]), resume=True)
    # how the remaining rounds run may change
    summary = run_inprocess(resume_config(cfg.run_dir(), ["rounds=2", "round-timeout=30"]),
                            resume=True)
    assert summary["rounds"] == 2


# --- item 3: SLoRA's switch is resolved once -------------------------------------------------

def test_slora_extension_keeps_the_default_switch_round(tiny_models, tmp_path,
                                                        flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "method=slora", "rounds=4",
                      "slora-density=0.1")
    assert cfg.slora_stage1_rounds is None  # the default: rounds // 4, resolved at the start
    run_inprocess(cfg)
    saved = (cfg.run_dir() / "config.toml").read_text()
    assert "slora-stage1-rounds = 1" in saved
    summary = run_inprocess(resume_config(cfg.run_dir(), ["rounds=12"]), resume=True)
    rounds = read_rounds(cfg.run_dir())
    assert [r["round"] for r in rounds] == list(range(1, 13))
    assert summary["failures"] == 0 and summary["skipped-rounds"] == 0
    assert all(r["method-state"]["stage1-rounds"] == 1 for r in rounds)
    assert [r["method-state"]["trained-stage"] for r in rounds] == [1] + [2] * 11


# --- item 4: a run that cannot learn stops, with the clients' error --------------------------

def test_every_client_failing_stops_the_run_with_their_error(tiny_models, tmp_path,
                                                             flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=3", "fail-rate=1.0")
    with pytest.raises(RunFailedError, match=r"round 1: every sampled client failed.*"
                                             r"injected failure"):
        run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert [r["round"] for r in rounds] == [1]  # the failed round is logged, then it stops
    assert not (cfg.run_dir() / "summary.json").exists()


def test_a_divergent_learning_rate_stops_the_run(tiny_models, tmp_path,
                                                 flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=2", "lr=1e12",
                      "max-grad-norm=0", "method=fedft", "local-epochs=3")
    with pytest.raises(RunFailedError, match="training loss became"):
        run_inprocess(cfg)


def test_rounds_without_a_valid_update_stop_after_max_failed_rounds(tiny_models, tmp_path,
                                                                    flower_identity):  # noqa: F811
    # every update is rejected (NaN): not client errors, so the run goes on for two rounds
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=5", "fail-rate=1.0",
                      "fail-mode=nan", "max-failed-rounds=2", "on-round-failure=skip")
    with pytest.raises(RunFailedError, match=r"no valid update for 2 rounds in a row.*finite"):
        run_inprocess(cfg)
    assert [r["skipped"] for r in read_rounds(cfg.run_dir())] == [True, True]


@pytest.mark.slow
def test_a_failed_simulation_says_why_and_exits_non_zero(tiny_models, tmp_path, capsys):
    from fedpeft.cli import main

    out = tmp_path / "run"
    code = main(["run", f"model={tiny_models('bert')}", "lora-rank=2", "num-clients=2",
                 "clients-per-round=2", "rounds=2", "max-train-samples=16",
                 "max-test-samples=8", "fail-rate=1.0", "progress=false", f"out={out}"])
    err = capsys.readouterr().err
    assert code != 0
    assert "every sampled client failed" in err and "injected failure" in err
    assert "Traceback" not in err and "without a summary" not in err


# --- invalid values are refused before any training ------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ("weight-decay=-1", "weight-decay must be >= 0"),
    ("threads=-1", "threads must be >= 0"),
    ("lr=0", "lr must be a finite number > 0"),
    ("lr=nan", "lr must be a finite number > 0"),
    ("lr=inf", "lr must be a finite number > 0"),
    ("max-grad-norm=-1", "max-grad-norm must be >= 0"),
    ("alpha=inf", "alpha must be a finite number"),
])
def test_invalid_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="device=cuda: CUDA is not available"):
        load_config(None, ["device=cuda"])


def test_max_length_beyond_the_models_positions_is_refused_before_training(tiny_models,
                                                                           tmp_path):
    from fedpeft.federation.server_app import open_run

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "max-length=129")
    with pytest.raises(ConfigError, match=r"max-length=129 exceeds .* allow 128 tokens"):
        open_run(cfg)
    assert not cfg.run_dir().exists()
    # unset, the task's default (QA: 384) is capped at the model's limit
    from transformers import AutoModel

    from fedpeft.models import max_input_length
    from fedpeft.tasks import make_task

    task = make_task(tiny_config(tiny_models("bert"), str(tmp_path / "qa"), "task=squad-files"))
    task.length_limit = max_input_length(AutoModel.from_pretrained(tiny_models("bert")))
    assert task.default_max_length == 384 and task.max_length == 128


# --- item 6: a finite default round timeout ---------------------------------------------------

def test_the_default_round_timeout_is_finite_and_0_means_for_ever():
    assert RunConfig().round_timeout == 3600.0
    assert load_config(None, ["round-timeout=0"]).round_timeout == 0.0


# --- item 7: a node with other pretrained weights refuses -------------------------------------

def test_a_node_with_other_pretrained_weights_refuses_to_train(tiny_models, tmp_path,
                                                               flower_identity):  # noqa: F811
    import shutil

    from transformers import AutoModel

    from fedpeft.federation.server_app import open_run, run_server

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models("bert"), model_dir)
    cfg = tiny_config(str(model_dir), str(tmp_path / "run"), "rounds=1")
    log, runtime, _ = open_run(cfg)  # the server loads the weights as they are now
    other = AutoModel.from_pretrained(model_dir)
    with torch.no_grad():
        other.encoder.layer[0].attention.self.query.weight.mul_(1.01)  # another revision
    other.save_pretrained(model_dir)
    runtime_module._CACHE.clear()  # the nodes load the model from the files they have
    from inprocess import InProcessGrid

    with pytest.raises(RunFailedError, match="pretrained model differs from the server's"):
        run_server(InProcessGrid(cfg.num_clients), cfg, log, runtime=runtime)
    runtime_module._CACHE.clear()


def test_the_weights_fingerprint_sees_a_single_changed_value(tiny_models):
    from transformers import AutoModel

    from fedpeft.federation.runtime import weights_fingerprint

    model = AutoModel.from_pretrained(tiny_models("bert"))
    before = weights_fingerprint(model)
    assert weights_fingerprint(AutoModel.from_pretrained(tiny_models("bert"))) == before
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[3, 5] += 1e-6
    assert weights_fingerprint(model) != before


# --- item 11: SLoRA's switch round logs the model it trained ----------------------------------

def test_slora_switch_round_logs_the_stage1_model_and_the_switched_one(
        tiny_models, tmp_path, flower_identity):  # noqa: F811
    common = ["method=slora", "rounds=2", "slora-density=0.1"]
    switch = tiny_config(tiny_models("bert"), str(tmp_path / "switch"), *common,
                         "slora-stage1-rounds=1")
    sparse = tiny_config(tiny_models("bert"), str(tmp_path / "sparse"), *common,
                         "slora-stage1-rounds=2")
    run_inprocess(switch)
    run_inprocess(sparse)
    s1, _ = read_rounds(switch.run_dir())
    p1, _ = read_rounds(sparse.run_dir())
    # round 1 trained the same sparse model in both runs: the same metrics
    assert s1["metrics"] == p1["metrics"]
    assert "metrics-after-switch" in s1 and "metrics-after-switch" not in p1
    assert set(s1["metrics-after-switch"]) == set(s1["metrics"])


# --- item 9: the hub is the user's --------------------------------------------------------

def test_fedpeft_leaves_the_hub_to_the_users_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FLWR_", "RAY_"))}
    env["HOME"] = str(tmp_path)
    code = ("import os; from fedpeft import offline; offline.apply(); "
            "import fedpeft.federation.server_app; "
            "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('FLWR_TELEMETRY_ENABLED'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["None", "0"]  # Flower's telemetry off, the hub untouched


def test_a_hub_id_that_cannot_be_had_names_the_model(monkeypatch):
    from fedpeft.models import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model=no-such-org/no-such-model: cannot load it: "
                                          r"it is not a local folder"):
        load_tokenizer("no-such-org/no-such-model")


def test_a_folder_that_is_not_a_model_names_it(tmp_path):
    from fedpeft.models import load_tokenizer

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=rf"model={tmp_path}: cannot load it: it is a folder"):
        load_tokenizer(str(tmp_path))


def test_checked_values_are_plain_numbers():
    # the fingerprint and the resolved config travel as JSON/ConfigRecord values
    cfg = load_config(None, ["method=slora", "rounds=9"]).resolved()
    assert json.loads(cfg.to_json())["slora-stage1-rounds"] == 2
    assert np.isscalar(cfg.slora_stage1_rounds)
    assert Path(cfg.run_dir()).name.startswith("semeval-slora")


# --- the library refuses what the CLI refuses ---------------------------------------------

def test_bad_config_files_name_the_file(tmp_path):
    cases = {"scalar.toml": b"fedpeft = 3\n", "binary.toml": b"\xff\xfe\x00r\x00o",
             "bad.toml": b"rounds = [\n"}
    messages = {"scalar.toml": "must be a table of settings", "binary.toml": "is not UTF-8",
                "bad.toml": "is not valid TOML"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=rf"{name}.*{messages[name]}"):
            load_config(tmp_path / name)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


@pytest.mark.parametrize(("override", "message"), [
    ("seed=-1", "seed must be >= 0"), ("task=nope", "task='nope' is unknown"),
    ("method=nope", "method='nope' is unknown"), ("out=runs/{nope}", "nope")])
def test_names_and_placeholders_are_checked_when_a_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_damaged_checkpoint_is_named(tmp_path):
    from fedpeft.federation.checkpoint import load_checkpoint

    (tmp_path / "checkpoint.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"checkpoint.safetensors is damaged"):
        load_checkpoint(tmp_path)


def test_overwrite_replaces_run_folders_only(tmp_path):
    from fedpeft.runlog import RunExistsError, RunLog

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(RunExistsError, match="holds no fedpeft run"):
        RunLog.create(load_config(None, [f"out={mine}"]), overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
