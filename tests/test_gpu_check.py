"""`make gpu-check` on the CPU: its table and pass/fail rules, the no-CUDA exit, its 1B model and its plan call.

The checks themselves need CUDA (checks/cuda_checks.py); what is tested here is what decides the
table and the exit status, and that the settings it runs are the ones it says (Nano-3's pattern,
the plan of the same elastify run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from star_elastic.accounting import count_params
from star_elastic.cli import main as cli_main
from star_elastic.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "checks"))
import cuda_checks  # noqa: E402  (checks/ is scripts, not a package)
import gpu_check  # noqa: E402
from gpu_check import Row  # noqa: E402

NANO3_CONFIG = Path(__file__).parent / "data" / "nemotron3_nano_30b_a3b" / "config.json"


def test_table_names_each_check_and_the_failed_ones_with_why():
    rows = [Row("elastify", True, "1,234 tokens/s"), Row("server", False, "3 answered", "2 differ"),
            Row("slice + reload", False, "", "above 0.002")]
    lines = gpu_check.render(rows).splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["check", "result", "figures", "why"]
    body = {ln.split(" | ")[0].strip(): [c.strip() for c in ln.split(" | ")] for ln in lines[2:-1]}
    assert body["elastify"][1:3] == ["PASS", "1,234 tokens/s"]
    assert body["server"][1:] == ["FAIL", "3 answered", "2 differ"]
    assert body["slice + reload"][1] == "FAIL" and body["slice + reload"][3] == "above 0.002"
    assert lines[-1] == "gpu-check: FAIL (2 of 3: server, slice + reload)"
    assert gpu_check.exit_status(rows) == 1


def test_all_rows_holding_is_the_only_exit_0():
    ok = [Row("a", True, "x"), Row("b", True, "y")]
    assert gpu_check.exit_status(ok) == 0
    assert gpu_check.render(ok).splitlines()[-1] == "gpu-check: PASS (2 of 2)"
    assert gpu_check.exit_status([]) == 1  # nothing proven
    assert gpu_check.render([]).splitlines()[-1] == "gpu-check: FAIL (no checks ran)"


def test_a_check_that_raises_is_a_failed_row_and_the_later_checks_run():
    ran = []

    def broken():
        raise FileNotFoundError("run/metrics.jsonl")

    def fine():
        ran.append("fine")
        return Row("fine", True, "1 s")

    rows = gpu_check.run_checks([("elastify", broken), ("fine", fine)], log=lambda msg: None)
    assert rows == [Row("elastify", False, why="FileNotFoundError: run/metrics.jsonl"), Row("fine", True, "1 s")]
    assert ran == ["fine"] and gpu_check.exit_status(rows) == 1


@pytest.mark.parametrize("mask, smi, want", [
    (None, ["GPU 0: NVIDIA H100 (UUID: a)", "GPU 1: NVIDIA H100 (UUID: b)"], 2),
    ("1", ["GPU 0: x", "GPU 1: y"], 1),
    ("0,-1,1", ["GPU 0: x", "GPU 1: y"], 1),  # CUDA stops at the first invalid entry
    ("", ["GPU 0: x"], 0),
    ("-1", ["GPU 0: x"], 0),
    (None, [], 0),  # nvidia-smi without a GPU
    (None, None, 0),  # no nvidia-smi
])
def test_visible_gpus(mask, smi, want):
    env = {} if mask is None else {"CUDA_VISIBLE_DEVICES": mask}
    n, why = gpu_check.visible_gpus(env, smi)
    assert n == want and bool(why) == (want == 0)


def test_without_cuda_one_line_exit_0_nothing_installed_or_run(tmp_path):
    """Run as `make gpu-check` runs it, CUDA hidden: no venv built, no work folder, one line."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    venv, work = tmp_path / "venv", tmp_path / "work"
    done = subprocess.run([sys.executable, str(REPO / "checks" / "gpu_check.py"), "--venv", str(venv), "--work",
                           str(work)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["gpu-check: no CUDA device visible (CUDA_VISIBLE_DEVICES=''); nothing installed or run"]
    assert done.stderr == "" and not venv.exists() and not work.exists()


def test_the_checks_started_without_cuda_fail_with_a_reason(tmp_path):
    """cuda_checks.py is only started where nvidia-smi sees a GPU; if torch then does not, that is a failure."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(REPO / "checks" / "cuda_checks.py"), "--work", str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "torch sees CUDA | FAIL" in done.stdout and "torch.cuda.is_available() is False" in done.stdout
    assert not (tmp_path / "w").exists()


def test_nano3_like_is_nano3_at_nano3_widths_and_1b_at_the_check_widths():
    nano3 = ModelConfig.from_json(NANO3_CONFIG)
    same = count_params(cuda_checks.nano3_like(cuda_checks.NANO3_WIDTHS))
    assert same == count_params(nano3)  # total, active and every component
    small = cuda_checks.nano3_like()
    assert small.pattern == nano3.pattern and len(small.pattern) == 52
    for key in set(cuda_checks.NANO3) - {"pattern"}:
        assert getattr(small, key) == getattr(nano3, key), key
    total = count_params(small).total_params
    assert 1e9 <= total <= 2e9, total


def test_pytest_counts():
    out = "...s\nSKIPPED [1] tests/test_cuda.py:48: needs sm90\n3 passed, 1 skipped, 300 deselected in 12.31s\n"
    assert cuda_checks.pytest_counts(out) == {"passed": 3, "skipped": 1, "deselected": 300}
    assert cuda_checks.pytest_counts("error: no tests ran\n") == {}


def test_plan_call_is_the_plan_elastify_checks_for_the_same_run(tmp_path, monkeypatch, capsys):
    """gpu-check compares the measured peak with `star-elastic plan PLAN_ARGS`; elastify refuses or runs on its
    own plan of ELASTIFY_ARGS. Both command lines, as gpu-check spells them, must mean the same plan."""
    import star_elastic.train.elastify as elastify
    from star_elastic.plan import check_plan

    s = cuda_checks.settings(smoke=False, gpus=2)
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps(cuda_checks.nano3_like(s.widths).to_hf_dict()))  # plan reads only this
    data = tmp_path / "rows.jsonl"
    data.write_text('{"input_ids": [5, 6, 7]}\n')
    assert cli_main(cuda_checks.plan_args(parent, s)) == 0
    planned = json.loads(capsys.readouterr().out)
    seen = {}

    def fake_train(cfg, log=None):
        seen["plan"] = check_plan(elastify.plan_config(cfg, s.gpus), "elastifying", log=lambda msg: None)
        return {"rank": 1}

    monkeypatch.setattr(elastify, "train", fake_train)
    assert cli_main(cuda_checks.elastify_args(parent, data, tmp_path / "run", s)) == 0
    assert seen["plan"]["config"] == planned["config"]
    assert seen["plan"]["per_gpu_bytes"] == planned["per_gpu_bytes"] > 0
