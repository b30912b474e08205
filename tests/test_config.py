from pathlib import Path

import pytest

from intentlora.config import ConfigError, load_config, parse_assignment, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_offline_quickstart():
    cfg = load_config()
    assert cfg.model.name == "pypi:qwen2.5-coder-0.5b-instruct"
    assert Path(cfg.data.train).is_file() and Path(cfg.data.test).is_file()
    assert cfg.model.trust_remote_code is False
    assert cfg.train.pad_to_max_length is False


def test_seed_config_reproduces_the_reference_recipe():
    cfg = load_config(ROOT / "configs" / "seed_qwen2.5-1.5b.yaml")
    assert cfg.model.name == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert (cfg.data.max_length, cfg.train.batch_size, cfg.train.epochs, cfg.train.lr) == (64, 1, 1, 2e-5)
    assert cfg.train.pad_to_max_length and cfg.train.precision == "fp32"
    assert cfg.lora.head_init == "random" and cfg.train.min_steps == 0 and cfg.train.early_stopping_patience is None


def test_cli_overrides_beat_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 5\ndata:\n  labels: [a, b]\n")
    cfg = load_config(path, {"train.lr": "1e-3", "data.labels": "x,y,z", "train.epochs": None})
    assert cfg.train.lr == 1e-3
    assert cfg.train.epochs == 5  # None means "not given on the CLI"
    assert cfg.data.labels == ["x", "y", "z"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.nope": 1}, "unknown key 'train.nope'"),
        ({"nope.lr": 1}, "unknown config section 'nope'"),
        ({"train.batch_size": "many"}, "train.batch_size"),
        ({"train.group_by_length": "maybe"}, "expected true/false"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_roundtrip(tmp_path):
    cfg = load_config(None, {"train.lr": 3e-4, "lora.target_modules": "q_proj,k_proj"})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_parse_assignment_reads_yaml_values():
    assert parse_assignment("train.epochs=2") == ("train.epochs", 2)
    assert load_config(None, dict([parse_assignment("train.lr=1e-4")])).train.lr == 1e-4
    assert parse_assignment("lora.target_modules=[q_proj, v_proj]") == ("lora.target_modules", ["q_proj", "v_proj"])
    with pytest.raises(ConfigError):
        parse_assignment("train.lr")


def test_quickstart_yaml_matches_the_defaults():
    assert load_config(ROOT / "configs" / "quickstart.yaml") == load_config()


RECIPE_KEYS = {
    "data": ["prompt_template"],
    "lora": ["head_init", "top_layers"],
    "train": ["epochs", "min_steps", "max_steps", "early_stopping_patience", "lr", "head_lr", "loraplus_lr_ratio",
              "linear_probe_steps", "class_weights", "label_smoothing"],
}


def test_quickstart_yaml_spells_out_the_recipe():
    import yaml

    spelled = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    for section, keys in RECIPE_KEYS.items():
        missing = [key for key in keys if key not in spelled[section]]
        assert not missing, f"configs/quickstart.yaml does not spell out {section}: {missing}"


def test_recipe_values_from_the_command_line():
    cfg = load_config(None, dict(parse_assignment(a) for a in (
        "train.early_stopping_patience=none", "train.head_lr=1e-3", 'data.prompt_template="Q: {text}\\nA:"', "lora.head_init=label_words")))
    assert cfg.train.early_stopping_patience is None and cfg.train.head_lr == 1e-3
    assert cfg.data.prompt_template == "Q: {text}\nA:" and cfg.lora.head_init == "label_words"
    assert load_config(overrides={"data.prompt_template": "none"}).data.prompt_template is None  # --prompt-template none


def test_set_null_clears_a_setting_that_has_a_default():
    """`--set train.early_stopping_patience=null` means none, not "not given" (which keeps the default)."""
    from intentlora.config import Config

    assert Config().train.early_stopping_patience is not None
    cfg = load_config(None, {"train.early_stopping_patience": None}, [parse_assignment("train.early_stopping_patience=null")])
    assert cfg.train.early_stopping_patience is None
    assert load_config(None, {"train.early_stopping_patience": None}).train.early_stopping_patience == Config().train.early_stopping_patience
