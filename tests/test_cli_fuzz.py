"""CLI fuzz: random hostile configs, data files, budgets, architectures and paths (seeded).

Every case is built to be invalid. Each must end with exit status 2 and one `star-elastic ...:
error:` line (or argparse's usage error) on stderr, no traceback, and leave a pre-existing output
folder byte for byte as it was. Most cases run in-process (`cli.main`); two run as real
subprocesses.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import digest, randomize

from star_elastic import HybridLM, ModelConfig, save_model
from star_elastic.cli import main
from star_elastic.config import from_dict
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.train.elastify import ElastifyConfig, train

N_CASES = 60
PARENT = dict(hidden_size=32, pattern="M*E-", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=32, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=16,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32)
AXES = ("hidden", "attn_heads", "mamba_heads", "experts", "expert_inter", "shared_inter", "mlp_inter")
JUNK = ["", " ", "nan", "-1", "1e999", "0", "∞", "../../", "a" * 300, "1,,", "\t=\t", "{}", "[1]", "null", "é=é"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A parent checkpoint with tokenizer, a 0-step run of it, and a pre-existing output folder."""
    root = tmp_path_factory.mktemp("fuzz")
    tok = build_tokenizer()
    model = randomize(HybridLM(ModelConfig(**PARENT, vocab_size=len(tok))), seed=0, scale=0.2)
    model.tokenizer = tok
    save_model(model, root / "parent")
    train(from_dict(ElastifyConfig, dict(model=str(root / "parent"), data="synthetic", out=str(root / "run"), steps=0,
                                         batch_size=2, n_synthetic=50, calibration_batches=1, router_fit_steps=10)),
          log=lambda m: None)
    assert main(["slice", str(root / "parent"), "--arch", "hidden=16", "--out", str(root / "keep")]) == 0
    (root / "a_file").write_text("not a folder")
    return root


# --- hostile pieces ---------------------------------------------------------------------------
def bad_arch(rng: random.Random) -> str:
    good = [f"{a}={rng.randint(1, 2)}" for a in rng.sample(AXES, rng.randint(0, 2))]
    bad = rng.choice([
        f"{rng.choice(AXES)}={rng.choice([0, -3, 10_000, 33])}", f"{rng.choice(AXES)}={rng.choice(JUNK)}",
        f"{rng.choice(['heads', 'width', 'depth', 'HIDDEN'])}=2", rng.choice(AXES), "experts=1",
        f"layers={rng.choice(['5-2', '0-99', 'x', '1+1-', '-1'])}", rng.choice(JUNK[5:]),
    ])
    parts = good + [bad]
    rng.shuffle(parts)
    return ",".join(parts)


def bad_arch_file(rng: random.Random) -> str:
    return rng.choice([
        "{", "[]", "{}", "5", '"x"', json.dumps({"a": 5}), json.dumps({"": {}}), json.dumps({"../x": {}}),
        json.dumps({"a": {"hidden": "big"}}), json.dumps({"a": {"layers": "zz"}}), json.dumps({"a": {"layers": [3, 1]}}),
        json.dumps({"a": {"foo": 1}}), json.dumps({"ok": {"hidden": 16}, "bad": bad_arch(rng)}),
        json.dumps({"a": {"hidden": 1.5}}), json.dumps({"a": {"layers": [0, 0]}}), "\x00\xff",
    ])


def bad_record(rng: random.Random) -> str:
    return rng.choice([
        "{", "[1, 2]", '"text"', "{}", '{"input_ids": [-1, 3]}', '{"input_ids": "abc"}', '{"input_ids": [1, 1000000000]}',
        '{"input_ids": [1.5, 2]}', '{"messages": "x"}', '{"messages": [{"role": "user"}]}', '{"text": 5}',
        '{"txt": "hello"}', '{"input_ids": [true, false]}', "NaN",
    ])


def bad_data(rng: random.Random, path: Path) -> Path:
    kind = rng.random()
    if kind < 0.1:
        path = path.with_suffix(rng.choice([".txt", ".csv", ""]))
        path.write_text('{"text": "hello world"}\n')
    elif kind < 0.2:  # a folder where a file should be
        path = path.with_suffix(".jsonl.d")
        path.mkdir()
    elif kind < 0.25:
        path.write_text("\n\n")
    else:
        lines = ['{"text": "2+2=4"}'] * rng.randint(0, 3) + [bad_record(rng)]
        rng.shuffle(lines)
        path.write_text("\n".join(lines) + "\n")
    return path


def bad_yaml(rng: random.Random) -> str:
    return rng.choice([
        "- 1\n- 2\n", "checkpoint_every: 0\n", "stepz: 3\n", "elastic: 5\n", "elastic: {budgets: [2]}\n", "lr: abc\n",
        ": : :\n", "batch_size: 0\n", "stage2_probs: [1, 2]\n", "tau: [0, 1]\n", "elastic: {axes: [width]}\n",
        "elastic: {budget_type: flops}\n", "min_lr_ratio: 7\n", "\x00\x01", "seq: [unclosed\n",
        "elastic: {choices: {hidden: [32, 17]}}\n", "stage2_probs: [0.2, 0.3, 0.5, 0.0]\n",
    ])


def bad_budgets(rng: random.Random) -> str:
    return rng.choice(["1.0,1.0", "0.5,1.0", "2", "0", "-0.5", "abc", "1.0;0.5", "nan", "1.0,0.5,0.5", "inf",
                       "1.0,nan", "1e-400"])


def bad_budget(rng: random.Random) -> str:
    return rng.choice(["0", "-1", "1.5", "7", "0.01", "nan", "inf", "-inf", "x"])


def bad_config_json(rng: random.Random) -> str:
    base = dict(PARENT, vocab_size=97, model_type="nemotron_h",
                hybrid_override_pattern=PARENT["pattern"], num_hidden_layers=4)
    base.pop("pattern")
    key = rng.choice(sorted(base))
    return rng.choice([
        "{", "[]", json.dumps(base | {"model_type": "llama"}), json.dumps(base | {key: -1}),
        json.dumps(base | {key: "x"}), json.dumps(base | {"hybrid_override_pattern": "MXE"}),
        json.dumps({k: v for k, v in base.items() if k != key}), json.dumps(base | {"num_hidden_layers": 9}),
        json.dumps(base | {"n_group": 4}), json.dumps(base | {"attention_bias": True}),
    ])


def bad_path(rng: random.Random, world: Path, tmp: Path, weights: bool = True) -> str:
    """A path that is no usable checkpoint (with `weights` False: not even its config.json is)."""
    kind = rng.randrange(4 if weights else 3)
    if kind == 0:
        return str(world / "nowhere" / rng.choice(["x", "run", ""]))
    if kind == 1:
        return str(world / "a_file")
    d = tmp / f"ckpt{rng.randrange(10**9)}"
    d.mkdir()
    (d / "config.json").write_text(bad_config_json(rng))
    if kind == 3:  # a good config over broken weights
        (d / "config.json").write_text((world / "parent" / "config.json").read_text())
        (d / "model.safetensors").write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 7, 100]))))
    return str(d)


def out_path(rng: random.Random, world: Path, tmp: Path) -> str:
    return rng.choice([str(world / "keep"), str(world / "a_file"), str(world / "a_file" / "below"),
                       str(tmp / f"new{rng.randrange(10**9)}")])


# --- cases --------------------------------------------------------------------------------------
def make_case(rng: random.Random, world: Path, tmp: Path) -> list[str]:
    parent, run = str(world / "parent"), str(world / "run")
    fresh = str(tmp / f"o{rng.randrange(10**9)}")
    f = tmp / f"f{rng.randrange(10**9)}.jsonl"
    kind = rng.randrange(12)
    if kind == 0:
        return ["info", bad_path(rng, world, tmp, weights=False)]
    if kind == 1:
        return ["slice", rng.choice([parent, run]), "--arch", bad_arch(rng), "--out", out_path(rng, world, tmp)]
    if kind == 2:
        f.write_text(bad_arch_file(rng), errors="surrogateescape")
        return ["slice", parent, "--arch-file", str(f), "--out", out_path(rng, world, tmp)]
    if kind == 3:
        return ["slice", run, "--budget", bad_budget(rng), "--out", out_path(rng, world, tmp)]
    if kind == 4:
        return ["slice", bad_path(rng, world, tmp), rng.choice(["--arch", "--budget"]), "0.5" if rng.random() < .5
                else "hidden=16", "--out", fresh]
    if kind == 5:
        return ["elastify", "--model", parent, "--data", str(bad_data(rng, f)), "--steps", "1",
                "--out", rng.choice([fresh, str(world / "keep"), str(world / "a_file")])]
    if kind == 6:
        return ["elastify", "--model", parent, "--data", "synthetic", "--budgets", bad_budgets(rng), "--steps", "1",
                "--out", fresh]
    if kind == 7:
        y = f.with_suffix(".yaml")
        y.write_text(bad_yaml(rng), errors="surrogateescape")
        return ["elastify", "--model", parent, "--data", "synthetic", "--config", str(y), "--steps", "1", "--out", fresh]
    if kind == 8:
        return ["elastify", "--model", bad_path(rng, world, tmp), "--data", "synthetic", "--steps", "1", "--out", fresh]
    if kind == 9:
        flags = rng.choice([["--think", bad_budget(rng)], ["--think", "small"],
                            ["--arch-file", str(f), "--think", rng.choice(["small", "full"])]])
        f.write_text(bad_arch_file(rng), errors="surrogateescape")
        return ["generate", rng.choice([run, parent, bad_path(rng, world, tmp)]), "hi", *flags,
                "--max-think-tokens", "2", "--max-answer-tokens", "2"]
    if kind == 10:
        f.write_text(rng.choice(['{"prompt": "1+1"}\n', "{\n", '{"answer": "2"}\n', "[]\n"]))
        return ["eval", run, "--data", str(f), "--n-test", "2"]
    y = f.with_suffix(".yaml")
    y.write_text(rng.choice(["quant: {format: int4}\n", "quant: 5\n", "qad_steps: -1\n", "nope: 1\n"]))
    return ["quantize", rng.choice([run, bad_path(rng, world, tmp)]), "--config", str(y),
            "--out", rng.choice([fresh, str(world / "a_file")])]


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage line + error line, status 2
        code = exc.code
    return code, capsys.readouterr().err


def check(argv: list[str], code: int, err: str) -> None:
    assert code not in (0, None), argv
    assert "Traceback" not in err, (argv, err)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith(("star-elastic ", "usage:")) or "error:" in last, (argv, err)


def test_fuzz_cli_in_process(world, tmp_path, capsys):
    rng = random.Random(1234)
    keep, victim = digest(world / "keep"), (world / "a_file").read_text()
    kinds = set()
    for _ in range(N_CASES):
        argv = make_case(rng, world, tmp_path)
        code, err = run_in_process(argv, capsys)
        check(argv, code, err)
        kinds.add(argv[0])
    assert kinds >= {"info", "slice", "elastify", "generate", "eval", "quantize"}
    assert digest(world / "keep") == keep and (world / "a_file").read_text() == victim
    assert not any(p.name.endswith(".partial") for p in world.rglob("*"))


def test_fuzz_cli_subprocess(world, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    keep = digest(world / "keep")
    for argv in (["slice", str(world / "parent"), "--arch", "experts=1,hidden=16", "--out", str(world / "keep")],
                 ["elastify", "--model", str(world / "parent"), "--data", "synthetic", "--budgets", "1.0,0.7,0.7",
                  "--out", str(world / "a_file")]):
        proc = subprocess.run([sys.executable, "-m", "star_elastic.cli", *argv], capture_output=True, text=True, env=env)
        check(argv, proc.returncode, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert digest(world / "keep") == keep
