from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from palate.cli import COMMANDS
from palate.config import Config, apply_overrides, describe_config, load_config
from palate.errors import ConfigError


class Inner(Config):
    lr: float = Field(1e-3, description="learning rate")
    steps: int = Field(10, description="steps")


class Outer(Config):
    model: str = Field("tiny", description="model")
    tags: list[str] = Field(default_factory=list, description="tags")
    train: Inner = Field(default_factory=Inner, description="training")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, "model: foo\ntrain:\n  steps: 3\n")
    cfg = load_config(Outer, p, ["train.lr=1e-4", "tags=[a, b]"])
    assert cfg.model == "foo"
    assert cfg.train.steps == 3
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML alone would read "1e-4" as a string
    assert cfg.tags == ["a", "b"]


def test_unknown_key_names_file_and_field(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    assert str(p) in str(e.value) and "train.stpes" in str(e.value)
    assert "unknown key" in str(e.value)


def test_unknown_override_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(Outer, None, ["train.nope=1"])


def test_bad_type_names_field(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(Outer, p)


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError):
        apply_overrides({}, [bad])


def test_override_into_scalar_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"model": "x"}, ["model.sub=1"])


def test_missing_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, write(tmp_path, "- a\n- b\n"))


def test_show_lists_a_stages_inputs_before_the_shared_settings() -> None:
    names = [row[0] for row in describe_config(COMMANDS["ppo"][0]) if "." not in row[0]]
    assert names[:3] == ["model", "prompts", "reward"]
    assert names.index("max_prompts") < names.index("output_dir") < names.index("seed")
    assert sorted(names) == sorted(COMMANDS["ppo"][0].model_fields)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_stage_field_is_documented(name: str) -> None:
    rows = describe_config(COMMANDS[name][0])
    assert rows
    undocumented = [r[0] for r in rows if not r[3].strip()]
    assert not undocumented, f"{name}: fields without a description: {undocumented}"
