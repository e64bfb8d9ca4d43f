"""ExitConfig: validation messages, CLI exposure, conversion from task configs."""

import argparse
import math
from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from mue_fairseq.exits import ExitConfig


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"image_exit_threshold": 1.5}, "--image-exit-threshold"),
        ({"image_exit_threshold": math.nan}, "--image-exit-threshold"),
        ({"text_exit_threshold": -1.01}, "--text-exit-threshold"),
        ({"decoder_exit_threshold": 2.0}, "--decoder-exit-threshold"),
        ({"decoder_exit_threshold": math.nan}, "--decoder-exit-threshold"),
        ({"decay_theta": 1.1}, "--decay-theta"),
        ({"decay_beta": -0.1}, "--decay-beta"),
        ({"decay_beta": 1.5}, "--decay-beta"),
        ({"decay_tau": 0.0}, "--decay-tau"),
        ({"decay_tau": -1.0}, "--decay-tau"),
        ({"decay_tau": math.nan}, "--decay-tau"),
        ({"deebert_entropy_threshold": -0.1}, "--deebert-entropy-threshold"),
        ({"pabee_patience": 0}, "--pabee-patience"),
        ({"decoder_exit_policy": "static", "static_exit_layer": 0}, "--static-exit-layer"),
        ({"decoder_exit_policy": "static", "static_exit_layer": 7}, "--static-exit-layer"),
        ({"decoder_exit_policy": "similarity", "static_exit_layer": 3}, "--static-exit-layer"),
        ({"decoder_exit_policy": "bogus"}, "--decoder-exit-policy"),
    ],
)
def test_validation_names_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        ExitConfig(**kwargs).validate(num_encoder_layers=6, num_decoder_layers=6)


def test_validation_message_format():
    with pytest.raises(ValueError, match=r"--image-exit-threshold must be in \[-1, 1\], got 1.5"):
        ExitConfig(image_exit_threshold=1.5).validate()


def test_boundary_values_accepted():
    cfg = ExitConfig(
        image_exit_threshold=1.0,
        text_exit_threshold=-1.0,
        decoder_exit_threshold=1.0,
        decay_theta=1.0,
        decay_beta=0.0,
        pabee_patience=1,
        deebert_entropy_threshold=0.0,
        decoder_exit_policy="static",
        static_exit_layer=6,
    )
    assert cfg.validate(6, 6) is cfg
    ExitConfig(decay_beta=1.0).validate()
    ExitConfig(decoder_exit_policy="static", static_exit_layer=12).validate()  # depth unknown


def test_enabled():
    assert not ExitConfig().enabled
    assert ExitConfig(encoder_exit=True).enabled
    assert ExitConfig(decoder_exit_policy="pabee").enabled


@dataclass
class _NestedTaskConfig(FairseqDataclass):
    data: str = field(default="", metadata={"help": "data"})
    exits: ExitConfig = field(default_factory=ExitConfig)


@dataclass
class _FlatTaskConfig(ExitConfig):
    data: str = field(default="", metadata={"help": "data"})


@pytest.mark.parametrize("task_cls", [_NestedTaskConfig, _FlatTaskConfig])
def test_cli_options_and_from_cfg(task_cls):
    parser = argparse.ArgumentParser()
    gen_parser_from_dataclass(parser, task_cls())
    args = parser.parse_args(
        "data --encoder-exit --image-exit-threshold 0.8 --decoder-exit-policy similarity "
        "--decoder-threshold-decay --decay-tau 2 --exit-stats-path /tmp/x.json".split()
    )
    assert args.encoder_exit and args.image_exit_threshold == 0.8
    # a task gets an omegaconf DictConfig; from_cfg turns it back into a real ExitConfig
    if task_cls is _NestedTaskConfig:
        dc = OmegaConf.structured(task_cls(exits=ExitConfig.from_cfg(args)))
    else:
        dc = OmegaConf.structured(ExitConfig.from_cfg(args))
    cfg = ExitConfig.from_cfg(dc)
    assert type(cfg) is ExitConfig
    assert cfg.encoder_exit and cfg.decoder_threshold_decay
    assert cfg.policy_name == "similarity" and cfg.decay_tau == 2.0
    assert cfg.stats_path("/res") == "/tmp/x.json"
    assert ExitConfig().stats_path("/res", "valid") == "/res/valid_exit_stats.json"
    assert ExitConfig().stats_path(None) is None


def test_bad_choice_rejected_by_cli():
    parser = argparse.ArgumentParser()
    gen_parser_from_dataclass(parser, ExitConfig())
    with pytest.raises(SystemExit):
        parser.parse_args(["--decoder-exit-policy", "bogus"])
