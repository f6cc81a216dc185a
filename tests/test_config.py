from pathlib import Path

import pytest

from fedpeft.config import ConfigError, RunConfig, load_config, to_toml


def test_overrides_are_typed_and_kebab_case():
    cfg = load_config(None, ["num-clients=8", "clients-per-round=4", "alpha=0.5", "lr=1e-3",
                             "target-modules=query,key", "max-length=none", "progress=false"])
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


# --- the settings groups (fedpeft.configs) ---------------------------------------------------

def test_every_setting_has_one_owner_and_the_run_lists_its_own_first():
    import dataclasses

    from fedpeft.config import GROUPS, ordered_fields, own_fields

    names = [f.name for f in ordered_fields()]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(RunConfig))
    assert len(names) == len(set(names))  # no setting in two groups
    own = {f.name for f in own_fields(RunConfig)}
    assert {"task", "method", "rounds", "lr"} <= own
    for group in GROUPS:  # a group's settings are not RunConfig's own
        assert own.isdisjoint(f.name for f in own_fields(group)), group
    assert {"lora_rank", "slora_density", "strategy"}.isdisjoint(own)
    assert list(RunConfig().to_dict())[:2] == ["task", "method"]


def test_each_method_names_the_settings_it_reads():
    from fedpeft.cli import method_settings
    from fedpeft.config import GROUPS
    from fedpeft.configs import AdapterConfig, LoraConfig, RankedLoraConfig, SLoRAConfig
    from fedpeft.methods import METHODS

    assert METHODS["slora"].config_classes == (LoraConfig, SLoRAConfig)
    assert METHODS["fedap"].config_classes == (AdapterConfig,)
    assert RankedLoraConfig in METHODS["hetlora"].config_classes
    assert METHODS["fedft"].config_classes == ()
    for cls in METHODS.values():
        assert set(cls.config_classes) <= set(GROUPS), cls
    text = method_settings(METHODS)
    assert "SLoRAConfig (slora): slora-stage1-rounds, slora-density, slora-stage1-lr" in text
    assert "none (fedft, fedbf)" in text


def test_help_config_lists_each_group_under_its_dataclass():
    from fedpeft.config import describe_fields

    lines = describe_fields().splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("SLoRAConfig "))
    assert "fedpeft.configs.slora" in lines[heading]
    assert lines[heading + 1].split()[0] == "slora-stage1-rounds"
    assert lines[0].split()[0] == "task"


def test_a_group_checks_its_own_fields_alone_and_inside_a_run():
    from fedpeft.configs import AdapterConfig, LoraConfig, SLoRAConfig

    with pytest.raises(ConfigError, match="lora-rank must be > 0, got 0"):
        LoraConfig(lora_rank=0).check_lora()
    with pytest.raises(ConfigError, match="adapter-reduction must be > 0, got -1"):
        AdapterConfig(adapter_reduction=-1).check_adapter()
    with pytest.raises(ConfigError, match=r"slora-density must be in \(0, 1\], got 1.5"):
        SLoRAConfig(slora_density=1.5).check_slora()
    with pytest.raises(ConfigError, match=r"slora-stage1-rounds must be in \[1, rounds=4\], got 5"):
        load_config(None, ["method=slora", "rounds=4", "slora-stage1-rounds=5"])
    with pytest.raises(ConfigError, match=r"slora-stage1-rounds must be in \[1, rounds=4\], got 0"):
        load_config(None, ["method=federa", "rounds=4", "slora-stage1-rounds=0"])
    # another method ignores SLoRA's switch (one `compare` shares it over its methods)
    assert load_config(None, ["method=federa", "rounds=4", "slora-stage1-rounds=5"]).rounds == 4
    with pytest.raises(ConfigError, match="lora-init=svd applies to method="):
        load_config(None, ["method=fedlr", "lora-init=svd"])
    assert load_config(None, ["method=slora", "rounds=8"]).resolved().slora_stage1_rounds == 2


def test_group_by_length_parses_true_false_and_none():
    assert load_config(None, ["group-by-length=true"]).group_by_length is True
    assert load_config(None, ["group-by-length=off"]).group_by_length is False
    assert load_config(None, []).group_by_length is None  # the task's default
    with pytest.raises(ConfigError, match="group-by-length must be true or false, got 'maybe'"):
        load_config(None, ["group-by-length=maybe"])
