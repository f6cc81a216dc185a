from pathlib import Path

import pytest

from fedpeft.config import ConfigError, RunConfig, load_config, to_toml


def test_overrides_are_typed_and_kebab_case():
    cfg = load_config(None, ["num-clients=8", "clients-per-round=4", "alpha=0.5", "lr=1e-3", "target-modules=query,key",
                             "max-length=none", "progress=false"])
    assert cfg.num_clients == 8 and cfg.alpha == 0.5 and cfg.lr == 1e-3
    assert cfg.target_modules == ["query", "key"]
    assert cfg.max_length is None and cfg.progress is False


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean num-clients"):
        load_config(None, ["num-client=3"])


@pytest.mark.parametrize("override, message", [
    ("clients-per-round=11", "exceeds num-clients"),
    ("alpha=0", "alpha"),
    ("lora-alpha=-1", "lora-alpha"),
    ("rounds=abc", "rounds must be int"),
    ("lr=-0.1", "lr must be a finite number > 0"),
    ("device=tpu", "device"),
])
def test_bad_values_are_rejected_before_training(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["num-clients=10", override])


def test_toml_file_then_overrides(tmp_path: Path):
    file = tmp_path / "run.toml"
    file.write_text('method = "fedlr"\nrounds = 7\nalpha = 1\n')
    cfg = load_config(file, ["rounds=9"])
    assert (cfg.method, cfg.rounds, cfg.alpha) == ("fedlr", 9, 1.0)
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = 'x'\n")
    with pytest.raises(ConfigError, match="rounds"):
        load_config(bad)


def test_resolved_config_round_trips():
    cfg = load_config(None, ["method=fedlr", "seed=3"])
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert 'method = "fedlr"' in to_toml(cfg)
    assert cfg.run_dir().name == "semeval-fedlr-a1.0-s3"
