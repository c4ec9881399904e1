"""The shipped YAML configs load through the same validators as the CLI; bad keys are named."""

from __future__ import annotations

from pathlib import Path

import dataclasses

import pytest
import yaml

from star_elastic.config import ConfigError, ModelConfig, from_dict, load_yaml
from star_elastic.demo import DemoConfig
from star_elastic.quant.qad import QuantizeConfig
from star_elastic.train.elastify import load_elastify_config
from star_elastic.train.parent import DEFAULT_PARENT, ParentConfig, load_parent_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_parent_yaml_equals_embedded_defaults():
    cfg = load_parent_config(str(CONFIGS / "parent.yaml"), {})
    assert cfg.model == ModelConfig(**DEFAULT_PARENT)
    assert cfg == ParentConfig()


def test_elastify_yaml_and_flag_overrides():
    demo = load_elastify_config(str(CONFIGS / "elastify.yaml"), {})
    assert demo == dataclasses.replace(DemoConfig().elastify, data="synthetic")  # the file writes out the demo's
    cfg = load_elastify_config(str(CONFIGS / "elastify.yaml"), {"steps": 7, "elastic.budget_type": "total_params"})
    assert cfg.steps == 7 and cfg.stage2_probs == (0.2, 0.3, 0.5)
    assert cfg.elastic.budgets == (1.0, 0.75, 0.5)
    assert cfg.elastic.budget_type == "total_params"
    with pytest.raises(ConfigError, match="stage2_probs has 3 entries for 2 budgets"):
        load_elastify_config(str(CONFIGS / "elastify.yaml"), {"elastic.budgets": [1.0, 0.6]})


def test_quantize_yaml():
    cfg = from_dict(QuantizeConfig, yaml.safe_load((CONFIGS / "quantize_nvfp4.yaml").read_text()))
    assert cfg.quant.format == "nvfp4" and cfg.qad_steps == 60


def test_unknown_and_bad_keys_are_named(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"p.yaml: unknown key\(s\) \['stepz'\]"):
        load_parent_config(str(bad), {})
    bad.write_text("model: {hidden: 3}\n")
    with pytest.raises(ConfigError, match=r"p.yaml: unknown key\(s\) \['model.hidden'\] for ModelConfig"):
        load_parent_config(str(bad), {})
    bad.write_text("model: {mamba_num_heads: 6}\n")  # checked on top of the parent's defaults (n_groups 2)
    assert load_parent_config(str(bad), {}).model.mamba_num_heads == 6
    bad.write_text("model: {mamba_num_heads: 5}\n")
    with pytest.raises(ConfigError, match="p.yaml: model: mamba_num_heads=5 is not a multiple of n_groups=2"):
        load_parent_config(str(bad), {})
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(ParentConfig, tmp_path / "missing.yaml")
