"""The elastify recipe end to end on a tiny parent: resume is bit-exact, the run folder slices into
transformers-loadable checkpoints that match the elastic model (multi-process: test_distributed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from star_elastic import HybridLM, ModelConfig, save_model
from star_elastic.cli import main
from star_elastic.config import ConfigError, from_dict
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.elastic.run import load_elastic
from star_elastic.train.elastify import ElastifyConfig, state_digest, train

TINY_PARENT = dict(hidden_size=32, pattern="M*E-", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=32, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2,
                   chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   moe_shared_expert_intermediate_size=32)


def save_tiny_parent(path: Path) -> Path:
    """The tiny parent (TINY_PARENT, the built-in tokenizer, seed 0) saved as a model folder."""
    tok = build_tokenizer()
    model = HybridLM(ModelConfig(**TINY_PARENT, vocab_size=len(tok))).init_weights(0)
    model.tokenizer = tok
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    return save_tiny_parent(tmp_path_factory.mktemp("parent"))


def config(parent_dir, out, **changes) -> ElastifyConfig:
    base = dict(model=str(parent_dir), data="synthetic", out=str(out), steps=6, batch_size=4, n_synthetic=200, calibration_batches=2,
                router_fit_steps=30, stage1_seq_len=32, stage2_seq_len=48, checkpoint_every=2)
    return from_dict(ElastifyConfig, base | changes)


@pytest.mark.parametrize("stop_after", [2, 3])  # settle_every 2: resumed at a projection step, and between two
def test_resume_equals_uninterrupted_bit_for_bit(parent_dir, tmp_path, stop_after):
    whole = train(config(parent_dir, tmp_path / "a", settle_every=2), log=lambda m: None)
    first = train(config(parent_dir, tmp_path / "b", settle_every=2, stop_after=stop_after), log=lambda m: None)
    assert not first["finished"]
    resumed = train(config(parent_dir, tmp_path / "b", settle_every=2, resume=True), log=lambda m: None)
    assert resumed["finished"]
    assert resumed["state_sha256"] == whole["state_sha256"]
    assert state_digest(load_elastic(tmp_path / "a")) == state_digest(load_elastic(tmp_path / "b"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("settle_every, expected", [(2, [2, 3, 4, 6]), (0, [3, 6])])
def test_budgets_are_projected_every_settle_every_steps_and_hold(parent_dir, tmp_path, monkeypatch, settle_every,
                                                                 expected):
    """The loop projects the router's picks onto the windows at every multiple of settle_every, at
    the stage boundary (step 3 of 6) and after training; after each projection every budget's
    architecture costs within ±2% of its target (budgets the tiny grid can hold)."""
    import star_elastic.train.elastify as recipe

    run, calls = tmp_path / "run", []

    def spy(elastic):
        recipe_settle(elastic)
        metrics = run / "metrics.jsonl"
        calls.append(len(metrics.read_text().splitlines()) if metrics.is_file() else 0)  # steps done so far
        for b in (0.75, 0.5):
            info = elastic.describe(b)
            assert info["held"] and abs(info["achieved"] / b - 1) <= 0.02 + 1e-9

    recipe_settle = recipe.settle
    monkeypatch.setattr(recipe, "settle", spy)
    train(config(parent_dir, run, settle_every=settle_every, elastic={"budgets": [1.0, 0.75, 0.5]}), log=lambda m: None)
    assert calls == expected


def test_interrupted_checkpoint_write_keeps_previous(parent_dir, tmp_path):
    train(config(parent_dir, tmp_path, stop_after=2), log=lambda m: None)
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".step-000004.tmp").mkdir()  # a save that died half way
    (ckpts / ".step-000004.tmp" / "weights.safetensors").write_bytes(b"partial")
    assert (ckpts / "latest").read_text() == "step-000002"
    resumed = train(config(parent_dir, tmp_path, resume=True), log=lambda m: None)
    assert resumed["finished"]


def test_cli_elastify_then_slice_loads_in_transformers(parent_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["elastify", "--model", str(parent_dir), "--data", "synthetic", "--budgets", "1.0,0.75,0.5",
                 "--steps", "2", "--stage1-seq-len", "16", "--stage2-seq-len", "32", "--batch-size", "2",
                 "--out", str(run)]) == 0
    elastic = load_elastic(run)
    ids = torch.randint(3, elastic.config.vocab_size, (2, 10))
    for budget in (1.0, 0.5):
        out = tmp_path / f"slice-{budget}"
        assert main(["slice", str(run), "--budget", str(budget), "--out", str(out), "--json"]) == 0
        info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(ref(ids).logits, elastic(ids, budget=budget), atol=1e-4, rtol=0)
        assert info["total_params"] == sum(p.numel() for p in ref.parameters())
        assert (out / "tokenizer.json").is_file()
    sliced_full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "slice-1.0")
    assert sum(p.numel() for p in sliced_full.parameters()) == elastic.model.num_parameters()


def test_bad_inputs(parent_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="stage2_probs has 2 entries for 3 budgets"):
        config(parent_dir, tmp_path, stage2_probs=(0.5, 0.5))
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ElastifyConfig, {"stepz": 3})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"format": "star-elastic-run", "version": 99}))
    assert main(["slice", str(tmp_path / "run"), "--budget", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "version 99 is not supported" in capsys.readouterr().err
    bad_data = tmp_path / "d.jsonl"
    bad_data.write_text('{"txt": "hello"}\n')
    assert main(["elastify", "--model", str(parent_dir), "--data", str(bad_data), "--out", str(tmp_path / "r2"),
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:1: a record needs exactly one of ['messages', 'text', 'input_ids'] (found keys ['txt'])" in err
    assert not (tmp_path / "r2" / "data").exists()  # no half-prepared store
    assert main(["quantize", str(tmp_path / "run"), "--out", str(tmp_path / "q")]) == 2
    assert "quantize needs --format fp8|nvfp4" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["quantize", str(tmp_path / "run"), "--format", "fp8", "--config", str(tmp_path / "list.yaml")]) == 2
    assert "list.yaml: expected a mapping of keys at the top level, got list" in capsys.readouterr().err


def test_zero_steps_gives_a_cost_fitted_run_within_2_percent(parent_dir, tmp_path):
    summary = train(config(parent_dir, tmp_path, steps=0), log=lambda m: None)
    assert summary["finished"]
    from star_elastic.elastic.projection import closest_achievable

    elastic = load_elastic(tmp_path)
    for b in elastic.ecfg.budgets:
        best = closest_achievable(elastic.cost, b)
        assert abs(elastic.describe(b)["achieved"] - b) <= max(0.02 * b, abs(best - b)) + 1e-9
    assert elastic.architecture(1.0) == elastic.space.architecture({a: 0 for a in elastic.space.axes})


def test_qad_lowers_the_distillation_loss_and_qrun_slices(parent_dir, tmp_path, capsys):
    from star_elastic import load_model

    train(config(parent_dir, tmp_path / "run", steps=2), log=lambda m: None)
    yaml_cfg = tmp_path / "q.yaml"  # the YAML says fp8 and another folder; the flags override both
    yaml_cfg.write_text(f"out: {tmp_path / 'elsewhere'}\nquant:\n  format: fp8\nqad_steps: 12\nbatch_size: 8\nseq_len: 48\n"
                        "n_synthetic: 300\n")
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "run"), "--config", str(yaml_cfg), "--format", "nvfp4",
                 "--out", str(tmp_path / "q")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "nvfp4" and summary["qad_steps"] == 12 and not (tmp_path / "elsewhere").exists()
    assert json.loads((tmp_path / "q" / "model" / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    assert summary["kd_final"] < summary["kd_ptq"]  # at the default learning rate
    assert main(["slice", str(tmp_path / "q"), "--budget", "0.5", "--out", str(tmp_path / "s")]) == 0
    sliced = load_model(tmp_path / "s")  # packed NVFP4 slice, dequantized on load
    elastic = load_elastic(tmp_path / "q")
    ids = torch.randint(3, sliced.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(sliced(ids), elastic(ids, budget=0.5), atol=1e-4, rtol=0)


def test_shipped_yaml_configs_load_and_flags_override_them():
    from star_elastic.config import ModelConfig, read_yaml_mapping
    from star_elastic.quant.qad import QuantizeConfig
    from star_elastic.train.elastify import load_elastify_config
    from star_elastic.train.parent import load_parent_config

    root = Path(__file__).resolve().parents[1] / "configs"
    parent = load_parent_config(str(root / "parent.yaml"), {"steps": 7})
    assert parent.steps == 7 and parent.model == ModelConfig(**read_yaml_mapping(root / "parent.yaml")["model"])
    raw = read_yaml_mapping(root / "elastify.yaml")
    elastify = load_elastify_config(str(root / "elastify.yaml"), {"lr": 0.5, "elastic.budget_type": "total_params"})
    assert (elastify.lr, elastify.elastic.budget_type, elastify.steps) == (0.5, "total_params", raw["steps"])
    assert list(elastify.elastic.budgets) == raw["elastic"]["budgets"]
    raw = read_yaml_mapping(root / "quantize_nvfp4.yaml")
    quantize = from_dict(QuantizeConfig, raw)
    assert (quantize.quant.format, quantize.qad_steps, quantize.lr) == ("nvfp4", raw["qad_steps"], raw["lr"])


def test_metrics_log_the_router_loss_parts_by_name(parent_dir, tmp_path):
    """Each step's budget penalty and capacity reward, recomputed from its logged cost and architecture
    with the band's dead zone (±1% for ±2%) and the parameter counts of the sliced config; the objective
    is kd + penalty − reward (router_weight 1), so it dips below 0 only by the reward."""
    from star_elastic.accounting import count_params

    train(config(parent_dir, tmp_path, steps=6, settle_every=0), log=lambda m: None)
    full = ModelConfig(**TINY_PARENT, vocab_size=len(build_tokenizer()))
    total = count_params(full).total_params
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["budget_penalty"] > 0 for r in records)  # a step outside its dead zone
    for r in records:
        dev = r["relative_cost"] / r["budget"] - 1
        excess = max(0.0, -0.01 - dev) + max(0.0, dev - 0.01)
        a = r["arch"]
        sized = full.replace(hidden_size=a["hidden"], num_attention_heads=a["attn_heads"] * full.num_key_value_heads,
                             mamba_num_heads=a["mamba_heads"] * full.n_groups, n_routed_experts=a["experts"],
                             moe_intermediate_size=a["expert_inter"], moe_shared_expert_intermediate_size=a["shared_inter"],
                             intermediate_size=a["mlp_inter"])
        assert r["budget_penalty"] == pytest.approx(excess + excess ** 2, abs=1e-9)
        assert r["capacity_reward"] == pytest.approx(0.01 * count_params(sized).total_params / total, rel=1e-9)
        assert r["objective"] == pytest.approx(r["kd"] + r["budget_penalty"] - r["capacity_reward"], abs=1e-12)
        assert "loss" not in r and "router" not in r
