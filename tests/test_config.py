from pathlib import Path

import pytest

from cogft.config import ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


MINIMAL = "model: {path: tiny://2b}\ndata: {path: data}\noutput_dir: runs/x\n"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    config = load_config(REPO / "configs" / name)
    assert config.output_dir


def test_unknown_key_names_key_and_allowed(tmp_path):
    path = write(tmp_path, MINIMAL + "train: {max_step: 10}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "train.max_step: unknown key" in message
    assert "max_steps" in message  # what is allowed


def test_bad_value_names_value_and_fix(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), ["data.num_frames=48"])
    message = str(info.value)
    assert "data.num_frames" in message and "48" in message and "4k+1" in message and "49" in message


def test_bad_choice_lists_allowed(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), ["train.mode=dora"])
    assert "train.mode" in str(info.value) and "'lora'" in str(info.value) and "'sft'" in str(info.value)


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="model: required key is missing"):
        load_config(write(tmp_path, "data: {path: data}\noutput_dir: x\n"))


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size.*'two'"):
        load_config(write(tmp_path, MINIMAL), ["train.batch_size=two"])


def test_overrides_are_yaml_typed():
    assert parse_overrides(["train.max_steps=7", "lora.target_modules=[to_q, to_v]", "train.resume=null"]) == {
        "train": {"max_steps": 7, "resume": None},
        "lora": {"target_modules": ["to_q", "to_v"]},
    }
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides(["train.max_steps"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        load_config(tmp_path / "nope.yaml")
