"""The bad inputs a new user hits (issue 10, part 3): each one works or fails in one line, and
nothing that existed before is touched."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ELASTIC_TINY, digest, randomize, tiny_config

from star_elastic import HybridLM, ModelConfig, save_model
from star_elastic.cli import main
from star_elastic.config import ConfigError, ElasticConfig, from_dict
from star_elastic.data.loading import open_data
from star_elastic.elastic.run import load_elastic
from star_elastic.elastic.space import ChoiceSpace
from star_elastic.train.elastify import ElastifyConfig, default_stage2_probs

TINY_PARENT = dict(hidden_size=32, pattern="M*E-", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=32, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2,
                   chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   moe_shared_expert_intermediate_size=32, vocab_size=50)


def one_line_error(capsys, expected: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err, err
    assert [line for line in err.splitlines() if line.startswith("star-elastic")] == [err.strip().splitlines()[-1]]


def test_stage2_probs_default_for_any_number_of_budgets_explicit_ones_checked():
    assert default_stage2_probs(3) == pytest.approx((0.5, 0.3, 0.2))  # the paper's
    for n in range(1, 7):
        p = default_stage2_probs(n)
        assert len(p) == n and sum(p) == pytest.approx(1) and list(p) == sorted(p, reverse=True)
        assert n == 1 or p[0] > p[1]  # skewed towards the full model
    cfg = from_dict(ElastifyConfig, {"elastic": {"budgets": [1.0, 0.6]}})
    assert cfg.stage2_probs == pytest.approx((0.6, 0.4))
    with pytest.raises(ConfigError, match="stage2_probs has 3 entries for 2 budgets"):
        from_dict(ElastifyConfig, {"elastic": {"budgets": [1.0, 0.6]}, "stage2_probs": [0.5, 0.3, 0.2]})
    with pytest.raises(ConfigError, match="sum to 1"):
        from_dict(ElastifyConfig, {"elastic": {"budgets": [1.0, 0.6]}, "stage2_probs": [0.5, 0.6]})


def test_elastify_two_budgets_pretokenized_data_without_tokenizer(tmp_path, capsys):
    model = HybridLM(ModelConfig(**TINY_PARENT)).init_weights(0)
    save_model(model, tmp_path / "parent")  # no tokenizer.json
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 50, (20,), generator=g).tolist()} for _ in range(16)]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = tmp_path / "e.yaml"
    yaml.write_text("router_fit_steps: 20\ncalibration_batches: 1\nbatch_size: 2\n")
    assert main(["elastify", "--model", str(tmp_path / "parent"), "--data", str(tmp_path / "ids.jsonl"),
                 "--budgets", "1.0,0.6", "--steps", "2", "--stage1-seq-len", "8", "--stage2-seq-len", "16",
                 "--config", str(yaml),
                 "--out", str(tmp_path / "run")]) == 0
    assert load_elastic(tmp_path / "run").ecfg.budgets == (1.0, 0.6)
    (tmp_path / "text.jsonl").write_text('{"text": "hello"}\n')
    assert main(["elastify", "--model", str(tmp_path / "parent"), "--data", str(tmp_path / "text.jsonl"),
                 "--out", str(tmp_path / "run2")]) == 2
    one_line_error(capsys, "text.jsonl:1: 'text' records need a tokenizer")
    with pytest.raises(ConfigError, match="big.jsonl:1: 'input_ids' has id 50 outside the vocabulary \\(size 50\\)"):
        (tmp_path / "big.jsonl").write_text('{"input_ids": [1, 50]}\n')
        open_data(str(tmp_path / "big.jsonl"), tmp_path / "prepared", str(tmp_path / "parent"), vocab_size=50)
    assert not (tmp_path / "prepared").exists()


def test_out_naming_an_existing_file_is_one_line_and_keeps_the_file(tmp_path, capsys):
    model = randomize(HybridLM(tiny_config(**ELASTIC_TINY)), seed=0).eval()
    save_model(model, tmp_path / "ckpt")
    victim = tmp_path / "existing.txt"
    victim.write_text("precious")
    commands = [
        ["train-parent", "--steps", "1", "--out", str(victim)],
        ["elastify", "--model", str(tmp_path / "ckpt"), "--data", "synthetic", "--out", str(victim)],
        ["slice", str(tmp_path / "ckpt"), "--arch", "hidden=32", "--out", str(victim)],
        ["slice", str(tmp_path / "ckpt"), "--arch", "hidden=32", "--out", str(victim / "below")],
        ["quantize", str(tmp_path / "ckpt"), "--format", "fp8", "--out", str(victim)],
        ["demo", "--quick", "--out", str(victim)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        one_line_error(capsys, "is a file")
        assert victim.read_text() == "precious"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    before = digest(tmp_path / "full")
    assert main(["slice", str(tmp_path / "ckpt"), "--arch", "hidden=32", "--out", str(tmp_path / "full")]) == 2
    one_line_error(capsys, "folder exists and is not empty")
    assert digest(tmp_path / "full") == before


def test_default_grid_on_mamba_head_dim_12_picks_whole_blocks():
    cfg = tiny_config(**(ELASTIC_TINY | dict(mamba_head_dim=12, mamba_num_heads=16)))  # 8 heads per group
    space = ChoiceSpace.build(cfg, ElasticConfig())
    assert space.choices["mamba_heads"] == (8, 4)  # 4 x 12 = 48 channels; 6 x 12 = 72 would split a block
    assert all(k * 12 % 16 == 0 for k in space.choices["mamba_heads"])
    with pytest.raises(ConfigError, match="runs of 36 input channels, not a multiple of elastic.multiple=16"):
        ChoiceSpace.build(cfg, ElasticConfig(choices={"mamba_heads": [8, 3]}))
    assert ChoiceSpace.build(cfg, ElasticConfig(choices={"mamba_heads": [8, 3]}, multiple=4)).choices["mamba_heads"] == (8, 3)
