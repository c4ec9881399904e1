"""Parameter and memory accounting, and the `star-elastic info` subcommand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from star_elastic import accounting
from star_elastic.accounting import count_params, format_count, layer_params, memory_bytes
from star_elastic.cli import main
from star_elastic.config import HF_BLOCK_NAMES, ConfigError, ModelConfig

NANO_DIR = Path(__file__).parent / "data" / "nemotron3_nano_30b_a3b"
# Nemotron-3-Nano-30B-A3B's published sizes, as transformers' NemotronHForCausalLM builds them.
NANO_TOTAL = 31_577_937_344
NANO_ACTIVE = 3_580_073_408
REPO = Path(__file__).resolve().parents[1]


def tiny(**changes) -> ModelConfig:
    """A model small enough to instantiate in milliseconds, with every block type."""
    base = ModelConfig(
        vocab_size=97, hidden_size=24, pattern="M*E-ME", num_attention_heads=4, num_key_value_heads=2,
        head_dim=6, intermediate_size=40, mamba_num_heads=4, mamba_head_dim=6, ssm_state_size=8,
        n_groups=2, conv_kernel=4, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=12,
        moe_shared_expert_intermediate_size=20,
    )
    return base.replace(**changes)


# --- the Nano-3 config ----------------------------------------------------------------------


def run_info_json(capsys, path) -> dict:
    """`star-elastic info PATH --json` in-process; stdout must be exactly one JSON object."""
    assert main(["info", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)  # fails on anything besides one JSON value
    assert isinstance(info, dict)
    assert captured.err == ""
    return info


def test_nano_info_json_counts(capsys):
    info = run_info_json(capsys, NANO_DIR)
    assert info["total_params"] == NANO_TOTAL
    assert info["active_params"] == NANO_ACTIVE
    assert info["num_layers"] == 52
    assert info["layer_counts"] == {"mamba": 23, "attention": 6, "moe": 23, "mlp": 0}
    assert (info["hidden_size"], info["vocab_size"]) == (2688, 131072)
    assert (info["n_routed_experts"], info["num_experts_per_tok"]) == (128, 6)
    assert info["pattern"] == "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    assert sum(info["breakdown"].values()) == NANO_TOTAL
    assert sum(info["active_breakdown"].values()) == NANO_ACTIVE


def test_nano_info_json_subprocess():
    # A real process, as a user runs it; the console script calls the same `main`.
    proc = subprocess.run(
        [sys.executable, "-m", "star_elastic.cli", "info", str(NANO_DIR), "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["total_params"], info["active_params"]) == (NANO_TOTAL, NANO_ACTIVE)


def test_nano_info_text(capsys):
    assert main(["info", str(NANO_DIR)]) == 0
    out = capsys.readouterr().out
    assert "31,577,937,344 (31.58 B)" in out
    assert "3,580,073,408 (3.58 B)" in out
    assert "23 mamba, 6 attention, 23 moe, 0 mlp" in out


def test_nano_layers_block_type_style_gives_same_counts(tmp_path, capsys):
    d = json.loads((NANO_DIR / "config.json").read_text())
    pattern = d.pop("hybrid_override_pattern")
    d["layers_block_type"] = [HF_BLOCK_NAMES[c] for c in pattern]
    (tmp_path / "config.json").write_text(json.dumps(d))
    info = run_info_json(capsys, tmp_path)
    assert (info["total_params"], info["active_params"]) == (NANO_TOTAL, NANO_ACTIVE)
    assert info["pattern"] == pattern


def test_info_accepts_config_file_path(capsys):
    info = run_info_json(capsys, NANO_DIR / "config.json")
    assert info["total_params"] == NANO_TOTAL


# --- parity with transformers ---------------------------------------------------------------

# Configs whose every flag transformers honours: counts must match its model exactly.
PARITY_CASES = {
    "all_blocks": tiny(),
    "mamba_biases": tiny(mamba_proj_bias=True),
    "no_conv_bias": tiny(use_conv_bias=False, pattern="MM-*"),
    "dense_mlp_bias": tiny(mlp_bias=True, pattern="M-*-"),
    "mha_moe_only": tiny(num_key_value_heads=4, pattern="E*E", num_experts_per_tok=1),
    "moe_mlp_bias": tiny(mlp_bias=True),
}
# Configs setting flags transformers 5.x ignores (see star_elastic.accounting's docstring).
IGNORED_FLAG_CASES = {
    "tied": tiny(tie_word_embeddings=True),
    "tied_all_biases": tiny(tie_word_embeddings=True, mlp_bias=True, mamba_proj_bias=True),
}


def hf_model(cfg: ModelConfig):
    """transformers' NemotronHForCausalLM for `cfg`, on the meta device (shapes only)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.NemotronHConfig(**cfg.to_hf_dict())
    with torch.device("meta"):
        return transformers.NemotronHForCausalLM(hf_cfg)


def hf_component(name: str, pattern: str) -> str:
    """The breakdown key an HF parameter name belongs to."""
    if name.startswith("model.embeddings."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if name == "model.norm_f.weight" or (name.endswith(".norm.weight") and ".mixer." not in name):
        return "norms"
    block = pattern[int(name.split(".")[2])]
    if block != "E":
        return {"M": "mamba", "*": "attention", "-": "mlp"}[block]
    for part, key in (("experts.", "moe_routed_experts"), ("shared_experts.", "moe_shared"), ("gate.", "moe_router")):
        if f".mixer.{part}" in name:
            return key
    raise AssertionError(f"unexpected MoE parameter {name}")


def hf_missing_params(cfg: ModelConfig, model) -> int:
    """Parameters `cfg` describes that transformers did not build (negative: built extra).

    Each term checks the model itself, so this drops to zero if transformers starts honouring a flag.
    """
    missing = 0
    if cfg.tie_word_embeddings and model.lm_head.weight is not model.model.embeddings.weight:
        missing -= cfg.vocab_size * cfg.hidden_size  # an untied head transformers built on its own
    return missing


@pytest.mark.parametrize("case", PARITY_CASES)
def test_total_params_match_transformers(case):
    cfg = PARITY_CASES[case]
    model = hf_model(cfg)
    counts = count_params(cfg)
    assert hf_missing_params(cfg, model) == 0
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    per_component = dict.fromkeys(counts.breakdown, 0)
    for name, p in model.named_parameters():
        per_component[hf_component(name, cfg.pattern)] += p.numel()
    assert counts.breakdown == per_component


@pytest.mark.parametrize("case", IGNORED_FLAG_CASES)
def test_total_params_with_flags_transformers_ignores(case):
    cfg = IGNORED_FLAG_CASES[case]
    model = hf_model(cfg)
    hf_total = sum(p.numel() for p in model.parameters())  # a tied weight would be yielded once
    assert count_params(cfg).total_params == hf_total + hf_missing_params(cfg, model)


def test_tied_embeddings_count_once():
    untied, tied = count_params(tiny()), count_params(tiny(tie_word_embeddings=True))
    assert untied.total_params - tied.total_params == tied.breakdown["embedding"]
    assert tied.breakdown["lm_head"] == 0


def test_correction_bias_is_a_buffer_not_counted():
    model = hf_model(tiny())
    buffers = [name for name, _ in model.named_buffers()]
    assert any(name.endswith("e_score_correction_bias") for name in buffers)
    assert not any(name.endswith("e_score_correction_bias") for name, _ in model.named_parameters())


@pytest.mark.parametrize("case", ["all_blocks", "mamba_biases", "mha_moe_only"])
def test_active_params_match_transformers_minus_unrouted_experts(case):
    cfg = PARITY_CASES[case]
    model = hf_model(cfg)
    unused = cfg.n_routed_experts - cfg.num_experts_per_tok
    active = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        if cfg.pattern[layer.layer_idx] == "E":
            experts = layer.mixer.experts
            # One expert is one slice along dim 0 of each 3D expert tensor.
            active -= unused * (experts.up_proj[0].numel() + experts.down_proj[0].numel())
    assert count_params(cfg).active_params == active


# --- the per-layer pieces later code builds budgets from ------------------------------------


def test_layers_sum_to_total():
    cfg = tiny()
    counts = count_params(cfg)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    outside_layers = cfg.vocab_size * cfg.hidden_size + head + cfg.hidden_size  # + final norm
    for active, expected in ((False, counts.total_params), (True, counts.active_params)):
        layers = sum(layer_params(cfg, block, active) for block in cfg.pattern)
        assert layers + outside_layers == expected


def test_reduced_config_counts():
    cfg = tiny()
    full, half = count_params(cfg), count_params(cfg.replace(n_routed_experts=3))
    assert half.breakdown["moe_routed_experts"] * 2 == full.breakdown["moe_routed_experts"]
    assert half.active_breakdown["moe_routed_experts"] == full.active_breakdown["moe_routed_experts"]
    assert accounting.mlp_params(10, 7, bias=True) == 10 * 7 + 7 + 7 * 10 + 10


def test_mixer_params_rejects_unknown_block():
    with pytest.raises(ValueError, match="unknown block type"):
        accounting.mixer_params(tiny(), "X")


def test_format_count():
    assert format_count(NANO_TOTAL) == "31,577,937,344 (31.58 B)"
    assert format_count(12_345_678) == "12,345,678 (12.35 M)"
    assert format_count(999) == "999"


# --- memory -----------------------------------------------------------------------------------


def test_memory_bytes_hand_computed():
    cfg = ModelConfig(
        vocab_size=10, hidden_size=4, pattern="M*", num_attention_heads=2, num_key_value_heads=1,
        head_dim=2, intermediate_size=8, mamba_num_heads=2, mamba_head_dim=2, ssm_state_size=3,
        n_groups=1, conv_kernel=4, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=4,
        moe_shared_expert_intermediate_size=4,
    )
    # Parameters by hand: embedding 40 + lm_head 40 + norms 3*4 = 92;
    # Mamba: inner 4, conv_dim 4+2*1*3 = 10; in_proj 4*(4+10+2) = 64, conv 10*4+10 = 50,
    #   dt_bias/A_log/D 6, gated norm 4, out_proj 16 -> 140;
    # attention: q 4*4 = 16, k 4*2 = 8, v 8, o 16 -> 48. Total 280.
    assert count_params(cfg).total_params == 280
    mem = memory_bytes(cfg, batch_size=3, context_len=5, bytes_per_param=2, kv_bytes=2, state_bytes=4)
    # KV: 1 layer * 2 (k and v) * 1 kv head * 2 head_dim * 5 tokens * 3 sequences * 2 bytes = 120.
    # SSM: 1 layer * 3 sequences * (4*3 state + 10*3 conv) * 4 bytes = 504.
    assert mem == {"weights": 560, "kv_cache": 120, "ssm_state": 504, "total": 1184}


def test_memory_bytes_nano_kv_scales_with_context_ssm_does_not():
    cfg = ModelConfig.from_json(NANO_DIR / "config.json")
    short, long = memory_bytes(cfg, 1, 1000), memory_bytes(cfg, 1, 2000)
    assert long["kv_cache"] == 2 * short["kv_cache"]
    assert long["ssm_state"] == short["ssm_state"]
    assert short["weights"] == 2 * NANO_TOTAL


def test_memory_bytes_rejects_negative_sizes():
    with pytest.raises(ValueError, match="context_len"):
        memory_bytes(tiny(), 1, -1)


# --- errors -----------------------------------------------------------------------------------


def expect_error(capsys, path, *words):
    """`info PATH` exits 2 with one stderr line naming every word, and prints nothing on stdout."""
    assert main(["info", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("star-elastic info: error:")
    for word in words:
        assert word in captured.err


def test_error_missing_directory(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    expect_error(capsys, missing, str(missing), "not found")


def test_error_directory_without_config(tmp_path, capsys):
    expect_error(capsys, tmp_path, str(tmp_path / "config.json"), "not found")


def test_error_wrong_model_type(tmp_path, capsys):
    d = json.loads((NANO_DIR / "config.json").read_text()) | {"model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    expect_error(capsys, tmp_path, str(tmp_path / "config.json"), "model_type", "llama")


def test_error_subprocess_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "star_elastic.cli", "info", "/nonexistent"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == "star-elastic info: error: /nonexistent: model directory not found\n"


def test_attention_bias_is_rejected():
    with pytest.raises(ConfigError, match="attention_bias"):
        tiny(attention_bias=True)


@pytest.mark.parametrize("case", list(PARITY_CASES) + list(IGNORED_FLAG_CASES))
def test_total_params_match_hybrid_lm(case):
    torch = pytest.importorskip("torch")
    from star_elastic import HybridLM

    cfg = (PARITY_CASES | IGNORED_FLAG_CASES)[case]
    with torch.device("meta"):
        model = HybridLM(cfg)
    assert count_params(cfg).total_params == sum(p.numel() for p in model.parameters())
