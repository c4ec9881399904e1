"""The memory planner against hand-computed parts, and Nemotron-3-Nano's state bytes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from star_elastic.cli import main
from star_elastic.config import ConfigError, ModelConfig
from star_elastic.distributed import EngineConfig
from star_elastic.plan import PlanConfig, plan

NANO3 = Path(__file__).parent / "data" / "nemotron3_nano_30b_a3b"


def mlp_only():
    """One dense MLP block: C=4, I=8, V=10 → embeddings 40 + head 40 + final norm 4 + block (norm 4 +
    up 32 + down 32 = 68) = 152 parameters; root unit 84."""
    return ModelConfig(vocab_size=10, hidden_size=4, pattern="-", intermediate_size=8, num_attention_heads=1,
                       num_key_value_heads=1, head_dim=4, mamba_num_heads=1, mamba_head_dim=4, n_groups=1,
                       ssm_state_size=4, n_routed_experts=1, num_experts_per_tok=1)


def fsdp(**kw) -> EngineConfig:
    return EngineConfig(parallel="fsdp", **kw)


def test_parts_by_hand_two_gpus_bf16():
    r = plan(mlp_only(), PlanConfig(gpus=2, seq_len=8, batch_size=4, engine=fsdp(dtype="bf16", gpu_memory_gb=4e-6)))
    assert r["params"] == 152
    assert r["parts"] == {
        "student_params": 4 * 152 // 2, "student_grads": 4 * 152 // 2, "optimizer_states": 8 * 152 // 2,
        "teacher": 152 * 2 // 2 + 84 * 2 // 2,  # bf16 shard + the rest of the gathered root unit
        "activations": 16 * (3 * 4 + 2 * 8 + 2 * 4) * 2,  # 16 tokens x (MLP block + 2 hidden states) x 2 B
        "kd_chunk": 16 * 10 * 4 * 6,  # the whole 16 tokens in one chunk, 6 fp32 (n, V) tensors
        "comm_buffers": 84 * 2 + 2 * 68 * 2 + 68 * 4,  # root + two blocks gathered, one block's fp32 grads
    }
    assert r["per_gpu_bytes"] == sum(r["parts"].values()) == 7156
    assert r["fits"] is False and r["gpu_memory_bytes"] == 4000
    assert plan(mlp_only(), PlanConfig(gpus=2, seq_len=8, batch_size=4,
                                       engine=fsdp(dtype="bf16", gpu_memory_gb=7.2e-6)))["fits"] is True
    # micro-batches of one sequence: half the activations and KD chunk of the 2-sequence forward
    one = plan(mlp_only(), PlanConfig(gpus=2, seq_len=8, batch_size=4, engine=fsdp(dtype="bf16", micro_batch_size=1)))
    assert one["parts"]["activations"] * 2 == r["parts"]["activations"]


def test_parts_by_hand_two_gpus_ddp():
    """DDP keeps a full replica on every GPU: states and teacher are not divided, and its gradient
    buckets are a second fp32 copy of the gradients."""
    r = plan(mlp_only(), PlanConfig(gpus=2, seq_len=8, batch_size=2, engine=EngineConfig(parallel="ddp")))
    assert r["mode"] == "ddp" and r["state_bytes"] == 16 * 152
    assert r["parts"] == {
        "student_params": 4 * 152, "student_grads": 4 * 152, "optimizer_states": 8 * 152,
        "teacher": 152 * 4,  # fp32, whole
        "activations": 8 * (3 * 4 + 2 * 8 + 2 * 4) * 4,
        "kd_chunk": 8 * 10 * 4 * 6,
        "comm_buffers": 152 * 4,
    }
    auto = plan(mlp_only(), PlanConfig(gpus=2, seq_len=8, batch_size=2, engine=EngineConfig(parallel="auto")))
    assert auto["mode"] == "fsdp" and auto["state_bytes"] == 16 * 152 // 2


def test_one_fp32_process_offload_and_checkpointing():
    r = plan(mlp_only(), PlanConfig(gpus=1, seq_len=8, engine=EngineConfig(activation_checkpointing=True,
                                                                          kd_chunk_tokens=4)))
    assert r["mode"] == "none"
    assert r["parts"]["comm_buffers"] == 0 and r["parts"]["teacher"] == 152 * 4  # unsharded: no FSDP buffers
    assert r["parts"]["activations"] == 8 * (4 + 28 + 2 * 4) * 4  # one block input + one block recomputed
    assert r["parts"]["kd_chunk"] == 4 * 10 * 4 * 6 and r["fits"] is None
    off = plan(mlp_only(), PlanConfig(gpus=1, engine=fsdp(optimizer_offload=True)))
    assert off["parts"]["student_params"] == off["parts"]["optimizer_states"] == 0


@pytest.mark.parametrize("gpus", [1, 8, 16])
def test_nano3_state_bytes(gpus):
    r = plan(ModelConfig.from_json(NANO3 / "config.json"), PlanConfig(gpus=gpus))
    assert r["params"] == 31_577_937_344
    assert r["state_bytes"] == 16 * 31_577_937_344 // gpus
    assert sum(r["parts"][k] for k in ("student_params", "student_grads", "optimizer_states")) == r["state_bytes"]


def test_plan_cli_json_and_bad_input(capsys):
    assert main(["plan", str(NANO3), "--gpus", "16", "--gpu-memory-gb", "80", "--seq-len", "8192",
                 "--micro-batch-size", "1", "--activation-checkpointing", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fits"] is True and r["per_gpu_bytes"] == sum(r["parts"].values())
    assert main(["plan", str(NANO3), "--gpus", "0"]) == 2
    assert "gpus must be positive, got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"dtype must be one of \['fp32', 'bf16'\], got 'fp16'"):
        EngineConfig(dtype="fp16")
    assert main(["plan", str(NANO3), "--parallel", "ddp", "--dtype", "bf16"]) == 2
    assert "dtype bf16 (fp32 master weights, bf16 compute) needs parallel fsdp" in capsys.readouterr().err


@pytest.mark.parametrize("name, data, gpus", [("nemotron-3-nano-30b", "nemotron3_nano_30b_a3b", 16),
                                              ("nemotron-nano-9b-v2", "nemotron_nano_9b_v2", 8)])
def test_real_recipes_load_and_fit_where_their_headers_say(name, data, gpus):
    from star_elastic.train.elastify import load_elastify_config

    cfg = load_elastify_config(str(Path(__file__).parents[1] / "configs" / f"{name}.yaml"), {})
    assert cfg.elastic.budgets == (1.0, 0.78, 0.56) and cfg.stage2_probs == (0.5, 0.3, 0.2)
    assert (cfg.stage1_seq_len, cfg.stage2_seq_len) == (8192, 49152) and cfg.router_lr > cfg.lr
    model = ModelConfig.from_json(Path(__file__).parent / "data" / data / "config.json")
    for seq_len in (cfg.stage1_seq_len, cfg.stage2_seq_len):
        pc = PlanConfig(gpus=gpus, seq_len=seq_len, batch_size=cfg.batch_size,
                        engine=dataclasses.replace(cfg.engine, gpu_memory_gb=80))
        assert plan(model, pc)["fits"]


def test_elastify_refuses_with_the_plan_when_it_cannot_fit(tmp_path, capsys):
    assert main(["elastify", "--model", str(NANO3), "--data", "synthetic", "--out", str(tmp_path / "run"),
                 "--stage2-seq-len", "8192", "--gpu-memory-gb", "80"]) == 2
    err = capsys.readouterr().err
    assert "elastifying needs more memory per GPU than there is" in err and "does NOT fit in 74.51 GiB" in err
    assert "optimizer_states" in err and not (tmp_path / "run").exists()  # refused before reading weights


def test_quantize_refuses_qad_that_cannot_fit_in_one_line_before_reading_weights(tmp_path, capsys):
    """QAD checks the same plan as elastify: an elastic run of Nemotron-3-Nano's shape (config only,
    no weights to read) at 8K tokens on one 80 GB GPU is refused, plan printed, QRUN never made."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    shutil.copy(NANO3 / "config.json", run / "model" / "config.json")
    (run / "run.json").write_text(json.dumps({"format": "star-elastic-run", "version": 1,
                                              "elastic": {"budgets": [1.0, 0.5]}}))
    assert main(["quantize", str(run), "--format", "fp8", "--qad-steps", "1", "--seq-len", "8192",
                 "--gpu-memory-gb", "80", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "QAD needs more memory per GPU than there is" in err and "does NOT fit in 74.51 GiB" in err
    assert "optimizer_states" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("star-elastic")] == [err.strip().splitlines()[-1]]
    assert not (tmp_path / "q").exists()
