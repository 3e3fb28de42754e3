"""The optimizer table is the one source: the config's names, the build, the resume, the refusals and the bytes of
`cogft estimate` all come from `OPTIMIZERS`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from cogft.config import ConfigError, TrainConfig
from cogft.config_file import build_config, load_config
from cogft.models.cost import estimate
from cogft.models.loading import load_variant
from cogft.optimizers import OPTIMIZERS, Launch, build_optimizer, reapply_settings

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {"model": {"path": "tiny://2b"}, "data": {"path": "data"}, "output_dir": "run"}


def _train(**keys) -> TrainConfig:
    return build_config({**MINIMAL, "train": keys}).train


def _step(optimizer, weight: torch.nn.Parameter, in_backward: bool) -> None:
    if in_backward:
        optimizer.begin(sync=True)  # the update happens inside backward
    ((weight.float() - 1.0) ** 2).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_builds_from_its_entry_and_resumes_exactly_with_the_configs_settings(name):
    entry = OPTIMIZERS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if entry.bf16_weights else torch.float32
    if problem := entry.problem(Launch(device=device.type, variant="tiny", dtype=dtype)):
        pytest.skip(problem)
    train = _train(optimizer=name, learning_rate=0.5 if entry.learning_rate else 1e-2, lr_warmup_steps=0)
    start = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    straight = torch.nn.Parameter(start.clone())
    optimizer = build_optimizer(train, [straight], device)
    assert all(optimizer.param_groups[0][key] == value for key, value in entry.settings(train).items())
    for _ in range(3):
        _step(optimizer, straight, entry.in_backward)

    # a resume as the trainer does it: built from the config, the checkpoint's state loaded, the settings re-applied
    resumed = torch.nn.Parameter(start.clone())
    first = build_optimizer(train, [resumed], device)
    _step(first, resumed, entry.in_backward)
    saved = first.state_dict()
    again = build_optimizer(train, [resumed], device)
    schedule = torch.optim.lr_scheduler.LambdaLR(again, lambda step: 1.0)
    again.load_state_dict(saved)
    reapply_settings(train, again, schedule)
    for _ in range(2):
        _step(again, resumed, entry.in_backward)
    assert torch.equal(straight, resumed) and not torch.equal(straight, start)

    # a safe change on resume applies: every value the entry's settings name, at the schedule's position
    changed = train.model_copy(update={"learning_rate": train.learning_rate * 2, "adam_beta2": 0.9,
                                       "lr_warmup_steps": 10})
    half = torch.optim.lr_scheduler.LambdaLR(again, lambda step: 0.5)
    reapply_settings(changed, again, half)
    group = again.param_groups[0]
    assert all(group[key] == value for key, value in entry.settings(changed).items() if key != "lr")
    assert group["lr"] == changed.learning_rate * 0.5 == half.get_last_lr()[0]


def test_the_config_accepts_exactly_the_tables_names_or_an_import_path():
    description = TrainConfig.model_fields["optimizer"].description
    assert all(name in description for name in OPTIMIZERS) and "module.Class" in description
    with pytest.raises(ConfigError) as refused:
        _train(optimizer="adam")
    message = str(refused.value)
    assert "train.optimizer" in message and "'adam'" in message and all(f"'{name}'" in message for name in OPTIMIZERS)
    assert _train(optimizer="torch.optim.Adafactor").optimizer == "torch.optim.Adafactor"
    with pytest.raises(ConfigError, match="train.optimizer"):  # not a name at all: refused, not a TypeError
        _train(optimizer=["adamw"])
    for name, entry in OPTIMIZERS.items():  # an optimizer's own default learning rate, unless the config sets one
        assert _train(optimizer=name).learning_rate == (entry.learning_rate or TrainConfig().learning_rate)
        assert _train(optimizer=name, learning_rate=0.25).learning_rate == 0.25


def test_each_package_is_an_extra_of_the_project_and_its_refusal_names_it(monkeypatch):
    pyproject = (REPO / "pyproject.toml").read_text()  # (no tomllib before Python 3.11)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    anywhere = Launch(device="cuda", variant="tiny", dtype=torch.bfloat16)
    for entry in OPTIMIZERS.values():
        if entry.package is None:
            assert entry.extra is None and entry.problem(anywhere) is None
            continue
        assert re.search(rf'^{entry.extra} = \[.*"{entry.package}\b', pyproject, re.M)  # the extra installs it
        assert f'pip install "cogft[{entry.extra}]"' in entry.problem(anywhere)
        assert f"pip install 'cogft[{entry.extra}]'" in TrainConfig.model_fields["optimizer"].description


def test_estimate_takes_each_optimizers_bytes_from_the_table(monkeypatch):
    config = load_config(REPO / "configs" / "cogvideox-2b-sft.yaml",
                         ["train.gradient_checkpointing=false", "train.compile=true"])
    variant = load_variant(config.model.path, config.model.dtype)

    def state_gib(name: str) -> float:
        lean = config.model_copy(update={"train": config.train.model_copy(update={"optimizer": name})})
        return estimate(lean, variant, advise=False).parts_gib["trainable_state"]

    # measured on an H200 (docs/performance.md): adamw8bit keeps 9.34 GiB less than adamw for 2B SFT
    saved = state_gib("adamw") - state_gib("adamw8bit")
    assert 9.0 < saved < 9.7
    for state_bytes in (50, 100):
        monkeypatch.setitem(OPTIMIZERS, f"s{state_bytes}", dataclasses.replace(OPTIMIZERS["prodigy"],
                                                                              state_bytes=state_bytes))
    per_byte = saved / (OPTIMIZERS["adamw"].state_bytes - OPTIMIZERS["adamw8bit"].state_bytes)
    assert state_gib("s100") - state_gib("s50") == pytest.approx(50 * per_byte, rel=0.01)
