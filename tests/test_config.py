from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llm2clip import cli
from llm2clip.config import ConfigError, config_keys, dump_config, load_config


@dataclass
class Inner:
    steps: int = 10
    rate: float = 1e-3
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Outer:
    path: Path = Path("x")
    flag: bool = False
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_file_and_overrides_apply_in_order(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("path: /data\ninner:\n  steps: 5\n")
    config = load_config(Outer, yaml_file, ["inner.steps=7", "inner.rate=1e-4", "maybe=3", "inner.names=q,k"])
    assert config.path == Path("/data")
    assert config.inner.steps == 7
    assert config.inner.rate == pytest.approx(1e-4)
    assert config.maybe == 3
    assert config.inner.names == ["q", "k"]
    assert config.flag is False


def test_unknown_key_names_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.stepz'.*inner\.steps"):
        load_config(Outer, None, ["inner.stepz=3"])
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("colour: red\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'colour'.*path, flag, maybe, inner\.steps"):
        load_config(Outer, yaml_file)


@dataclass
class WithOwnDefaults:
    inner: Inner = field(default_factory=lambda: Inner(steps=99, rate=0.5))


def test_a_partial_section_keeps_the_parent_defaults(tmp_path):
    config = load_config(WithOwnDefaults, None, ["inner.steps=3"])
    assert config.inner == Inner(steps=3, rate=0.5)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("inner:\n  names: [x]\n")
    assert load_config(WithOwnDefaults, yaml_file).inner == Inner(steps=99, rate=0.5, names=["x"])


def test_wrong_types_and_bad_files_are_named():
    with pytest.raises(ConfigError, match="'inner.steps' takes an integer"):
        load_config(Outer, None, ["inner.steps=many"])
    with pytest.raises(ConfigError, match="'flag' takes true or false"):
        load_config(Outer, None, ["flag=7"])
    with pytest.raises(ConfigError, match="not of the form KEY=VALUE"):
        load_config(Outer, None, ["inner.steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, "/no/such/file.yaml")


def test_dump_round_trips(tmp_path):
    config = load_config(Outer, None, ["maybe=4"])
    yaml_file = tmp_path / "dump.yaml"
    yaml_file.write_text(dump_config(config))
    assert load_config(Outer, yaml_file) == config
    assert config_keys(Outer) == ["path", "flag", "maybe", "inner.steps", "inner.rate", "inner.names"]


@pytest.mark.parametrize("words", [c.words for c in cli.COMMANDS])
def test_every_command_has_help_and_a_matching_config(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*words, "--help"])
    assert exit_info.value.code == 0
    assert "KEY=VALUE" in capsys.readouterr().out
    keys = cli.valid_keys(words)
    command = {c.words: c for c in cli.COMMANDS}[words]
    for flag in command.flags + ((command.positional,) if command.positional else ()):
        assert flag.key in keys, f"{flag.name} sets unknown key {flag.key}"


@pytest.mark.parametrize("name", ["tiny-stage1-mntp.yaml", "tiny-stage1-contrastive.yaml",
                                  "llama3-8b-stage1-mntp.yaml", "llama3-8b-stage1-contrastive.yaml"])
def test_shipped_configs_load(name):
    root = Path(__file__).resolve().parents[1]
    words = ("stage1", "mntp") if "mntp" in name else ("stage1", "contrastive")
    command = {c.words: c for c in cli.COMMANDS}[words]
    load_config(cli._resolve(command.config), root / "configs" / name)


def test_cli_reports_unknown_key_and_prints_config(capsys):
    assert cli.main(["stage1", "mntp", "train.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.max_stepz'" in err and "train.max_steps" in err
    assert cli.main(["stage1", "mntp", "--print-config", "train.max_steps=3", "--model", "/m"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "model: /m" in out


def test_flags_overrides_and_the_positional_mix_in_any_order(capsys):
    # Both failed with "unrecognized arguments" when KEY=VALUE items were one nargs="*" run.
    assert cli.main(["encode", "--model", "M", "adapters=A", "model_name=N", "--out", "emb.npy", "captions.txt",
                     "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "model: M" in out and "adapters:\n- A\n" in out and "model_name: N" in out
    assert "out: emb.npy" in out and "texts: captions.txt" in out
    assert cli.main(["stage2", "--data", "D", "split=null", "--cache", "C", "max_images=5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "data: D" in out and "split: null" in out and "cache: C" in out and "max_images: 5" in out
    # A later override still wins over an earlier one.
    assert cli.main(["stage2", "max_images=5", "--data", "D", "max_images=7", "--print-config"]) == 0
    assert "max_images: 7" in capsys.readouterr().out


def test_an_unknown_flag_anywhere_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["stage2", "max_images=5", "--cahce", "C"])
    assert exit_info.value.code == 2
    assert "llm2clip stage2: error: unrecognized arguments: --cahce" in capsys.readouterr().err
