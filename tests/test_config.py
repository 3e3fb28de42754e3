from pathlib import Path

import pytest

from cogft.config import ConfigError
from cogft.config_file import load_config, parse_overrides

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
        load_config(write(tmp_path, MINIMAL), ["train.max_steps=0"])
    message = str(info.value)
    assert "train.max_steps" in message and "0" in message and "greater than or equal to 1" in message


def test_a_frame_count_the_model_cannot_take_names_the_key_and_the_fix(tmp_path):
    """The 4k+1 rule is the model's (its VAE's time compression), checked when the model's configs are read."""
    from cogft.models.loading import load_for_config

    config = load_config(write(tmp_path, MINIMAL), ["data.num_frames=48", "model.path=THUDM/CogVideoX-2b"])
    with pytest.raises(ConfigError) as info:
        load_for_config(config)
    message = str(info.value)
    assert "data.num_frames=48" in message and "4k+1" in message and "try 45 or 49" in message
    with pytest.raises(ConfigError, match=r"data.min_frames=10: must be 4k\+1"):
        load_for_config(load_config(write(tmp_path, MINIMAL), ["data.min_frames=10", "model.path=THUDM/CogVideoX-2b"]))


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


@pytest.mark.parametrize("override,said", [
    ("train.learning_rate=.inf", "train.learning_rate"), ("train.learning_rate=.nan", "train.learning_rate"),
    ("train.learning_rate=0", "greater than 0"), ("train.seed=-1", "train.seed"),
    ("train.seed=4294967296", "train.seed"),
    ("lora.target_modules=[]", "lora.target_modules"), ("output_dir=", "output_dir"),
])
def test_values_the_run_cannot_use_are_refused_by_key(tmp_path, override, said):
    with pytest.raises(ConfigError, match=said):
        load_config(write(tmp_path, MINIMAL), [override])


def test_an_output_dir_that_is_or_sits_under_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("a file")
    for output_dir in (tmp_path / "taken", tmp_path / "taken" / "run"):
        with pytest.raises(ConfigError, match=f"output_dir: .*{tmp_path / 'taken'} is a file"):
            load_config(write(tmp_path, MINIMAL), [f"output_dir={output_dir}"])


def test_a_section_or_key_written_twice_is_refused_with_both_lines(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  max_steps: 10\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line 6: 'train' is written a second time \(first on line 4\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="'max_steps' is written a second time"):
        load_config(write(tmp_path, MINIMAL + "train:\n  max_steps: 10\n  max_steps: 20\n"))


def test_lora_targets_that_match_nothing_are_refused_before_prepare(make_config, tmp_path):
    from cogft.training.loop import train

    config = make_config("lora.target_modules=[to_q, attn_q]", f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match="lora.target_modules: attn_q match no linear layer of cogvideox-2b"):
        train(config)
    assert not (tmp_path / "cache").exists()  # nothing was encoded


@pytest.mark.parametrize("overrides,said", [
    (["validation.prompts=[a, b]", "validation.images=[x.png]"],
     ["validation.images has 1 entries for 2 validation.prompts", "give one image per prompt"]),
    (["model.fp8_base=true", "train.mode=sft"], ["model.fp8_base", "train.mode=sft", "use train.mode=lora"]),
    (["validation.prompts=[a]", "validation.every=50", "validation.at_end=false", "train.max_steps=10"],
     ["validation.every=50 > train.max_steps=10", "validation.at_end=true"]),
])
def test_cross_field_errors_name_the_keys_values_and_fix_without_the_whole_config(tmp_path, overrides, said):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), overrides)
    message = str(info.value)
    assert all(part in message for part in said), message
    assert "'model':" not in message and "Value error" not in message, message  # no dump of the resolved config
    assert len(message) < 400, message


def test_a_long_bad_value_is_shortened_in_the_message(tmp_path):
    with pytest.raises(ConfigError, match="validation.prompts: Input should be a valid list") as info:
        load_config(write(tmp_path, MINIMAL), [f"validation.prompts={'a long prompt, ' * 500}"])  # not a list
    assert len(str(info.value)) < 400


def test_image_batch_size_has_a_bound_that_names_the_key_and_the_fix(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), ["data.image_batch_size=64"]).data.image_batch_size == 64
    with pytest.raises(ConfigError, match=r"data\.image_batch_size: at most 64 .*"
                                          r"train\.gradient_accumulation_steps \(got 100000\)"):
        load_config(write(tmp_path, MINIMAL), ["data.image_batch_size=100000"])
