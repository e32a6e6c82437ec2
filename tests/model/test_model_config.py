"""Model presets and their validation; parameter counts of the published sizes."""
from __future__ import annotations

from dataclasses import replace

import pytest

from esen_train.model import ESEN, ModelConfig, load_model_config


def parameter_count(config: ModelConfig) -> int:
    return sum(parameter.numel() for parameter in ESEN(config).parameters())


def test_presets_have_the_published_sizes():
    assert 80_000 < parameter_count(load_model_config("tiny")) < 120_000
    # fairchem's OMol K4L2 backbone + energy head (fairchem's 5.96M adds a charge/spin layer).
    assert parameter_count(load_model_config("esen-sm")) == 5_931_521
    # eSEN-30M-OAM, Matbench Discovery model card: 30,161,153.
    assert parameter_count(load_model_config("esen-30m")) == 30_161_153


def test_direct_heads_add_parameters_under_their_own_prefix():
    config = load_model_config("tiny")
    plain, direct = ESEN(config), ESEN(replace(config, direct_forces=True))
    extra = set(direct.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("direct_heads.") for key in extra)
    assert set(plain.state_dict()) <= set(direct.state_dict())


def test_a_config_file_path_loads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("num_layers: 3\nlmax: 3\nmmax: 1\n")
    config = load_model_config(path)
    assert (config.num_layers, config.lmax, config.mmax, config.sphere_channels) == (3, 3, 1, ModelConfig().sphere_channels)


def test_an_unknown_key_fails_naming_it(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("num_layer: 3\n")
    with pytest.raises(ValueError, match="num_layer") as error:
        load_model_config(path)
    assert str(path) in str(error.value)


def test_a_wrong_type_or_value_fails_naming_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lmax: two\n")
    with pytest.raises(ValueError, match="lmax"):
        load_model_config(path)
    path.write_text("lmax: 2\nmmax: 3\n")
    with pytest.raises(ValueError, match="mmax"):
        load_model_config(path)
    path.write_text("feed_forward: conv\n")
    with pytest.raises(ValueError, match="feed_forward"):
        load_model_config(path)


def test_an_unknown_preset_is_not_found():
    with pytest.raises(FileNotFoundError, match="esen-xl"):
        load_model_config("esen-xl")
