"""The run folder has one writer, an existing run is never overwritten unasked, reused importance scores
belong to the parent and data they were computed from, and a resume continues the saved run exactly or
refuses in one line (train/runfolder.py). Multi-process (torchrun) cases: test_torchrun_stop.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import digest
from test_bad_inputs import one_line_error
from test_elastify import TINY_PARENT, config, save_tiny_parent

from star_elastic import HybridLM, ModelConfig
from star_elastic.cli import main
from star_elastic.config import ConfigError, from_dict
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.elastic import importance
from star_elastic.hf import load_model, save_model
from star_elastic.train.elastify import ElastifyConfig, importance_scores, open_store, train
from star_elastic.train.runfolder import LOCK, WriterLock, fingerprint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HOLD = ("import sys, time; from pathlib import Path; from star_elastic.train.runfolder import WriterLock; "
        "WriterLock.acquire(Path(sys.argv[1]), print); print('held', flush=True); time.sleep(600)")


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Two parents of the same shape and tokenizer, different weights (init seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("parents")
    other = HybridLM(ModelConfig(**TINY_PARENT, vocab_size=len(build_tokenizer()))).init_weights(1)
    other.tokenizer = build_tokenizer()
    save_model(other, root / "b")
    return save_tiny_parent(root / "a"), root / "b"


def names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_writer_lock_refuses_a_live_holder_and_takes_over_from_an_ended_one(parents, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = f"pid {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(ConfigError, match=re.escape(f"another elastify is writing this run folder ({who}")):
            train(config(parents[0], run, steps=2), log=quiet)
        assert names(run) == [LOCK]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    notes = []
    summary = train(config(parents[0], run, steps=2), log=notes.append)
    assert any(f"taking over from pid {holder.pid} on host" in n and "which has ended" in n for n in notes), notes
    assert summary["finished"] and not (run / LOCK).exists()  # released at the end


def _own_start() -> str:
    return Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_lock_records_of_ended_reused_live_and_remote_holders(tmp_path):
    """Lock files whose flock nobody holds, judged by their record: a pid that has ended, or that
    now belongs to a process started later (reused), is stale; this very process (running, same
    start) is live; another host's holder cannot be checked and is refused with what to do."""
    ended = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True).stdout)
    host = socket.gethostname()
    for pid, start in ((ended, "1"), (os.getpid(), "0")):
        (tmp_path / LOCK).write_text(json.dumps({"host": host, "pid": pid, "process_start": start, "since": "then"}))
        notes = []
        lock = WriterLock.acquire(tmp_path, notes.append)
        assert notes == [f"note: {tmp_path / LOCK}: taking over from pid {pid} on host {host}, since then, which has "
                         "ended"]
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        lock.release()
        assert not (tmp_path / LOCK).exists()
    (tmp_path / LOCK).write_text(json.dumps({"host": host, "pid": os.getpid(), "process_start": _own_start()}))
    with pytest.raises(ConfigError, match=f"another elastify is writing this run folder \\(pid {os.getpid()}"):
        WriterLock.acquire(tmp_path, quiet)
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 7, "since": "then"}))
    with pytest.raises(ConfigError, match=re.escape(f"held by pid 7 on host elsewhere, since then; this host cannot "
                                                    f"check whether that process still runs: if that job has ended, "
                                                    f"delete {tmp_path / LOCK} and run again")):
        WriterLock.acquire(tmp_path, quiet)
    (tmp_path / "other").mkdir()
    live = WriterLock.acquire(tmp_path / "other", quiet)
    with pytest.raises(ConfigError, match="another elastify is writing"):  # the flock alone: a second open file
        WriterLock.acquire(tmp_path / "other", quiet)
    live.release()


def test_out_naming_an_existing_run_is_refused_and_overwrite_leaves_nothing_of_it(parents, tmp_path):
    a, b = parents
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    train(config(a, run, steps=2, save_initial=True, checkpoint_every=1), log=quiet)
    before = digest(run)
    new = dict(steps=2, elastic={"budgets": [1.0, 0.6]})
    with pytest.raises(ConfigError, match="holds an earlier run; resume to continue it .* or overwrite to delete it"):
        train(config(b, run, **new), log=quiet)
    assert digest(run) == before
    (run / "notes.txt").write_text("mine")  # not the run's: stays
    notes = []
    over = train(config(b, run, overwrite=True, **new), log=notes.append)
    assert any(n.startswith("overwrite: removed the earlier run's") for n in notes)
    ref = train(config(b, fresh, **new), log=quiet)
    assert over["state_sha256"] == ref["state_sha256"]  # the overwritten folder holds the fresh run, bit for bit
    assert names(run) == sorted(names(fresh) + ["notes.txt"])  # no initial/, no checkpoint step 1 left
    old_scores, new_scores = (importance.load_scores(d / "importance.safetensors") for d in (run, fresh))
    assert all(torch.equal(old_scores[k], new_scores[k]) for k in new_scores)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and {m["budget"] for m in metrics} <= {1.0, 0.6}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="folder exists, is not empty and holds no elastify run"):
            train(config(a, foreign, overwrite=overwrite), log=quiet)
    assert names(foreign) == ["data.txt"]


def scores_for(model_dir: Path, out: Path, **changes) -> tuple[dict, list[str]]:
    """`importance_scores` of elastify for the parent in `model_dir`, with its log lines."""
    cfg = config(model_dir, out, **changes)
    parent = load_model(model_dir)
    store = open_store(cfg, parent, log=quiet)
    notes = []
    return importance_scores(cfg, parent, store, 0, 1, notes.append), notes


def same(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_importance_scores_are_reused_only_for_the_parent_and_batches_they_came_from(parents, tmp_path):
    a, b = parents
    run, path = tmp_path / "run", tmp_path / "run" / "importance.safetensors"
    fresh_b, _ = scores_for(b, tmp_path / "b")
    first, notes = scores_for(a, run)
    assert notes == [] and not same(first, fresh_b)
    shutil.copytree(a, tmp_path / "a_moved")  # the same parent in another folder
    for model_dir in (a, tmp_path / "a_moved"):
        again, notes = scores_for(model_dir, run)
        assert notes == [f"importance: reusing {path}"] and same(again, first)
    other, notes = scores_for(b, run)  # a different parent of the same shape
    assert notes[0] == (f"note: {path} was not computed from these parent weights (fingerprints differ); recomputing "
                        "the importance scores")
    assert same(other, fresh_b) and same(importance.load_scores(path), fresh_b)
    _, notes = scores_for(b, run, calibration_batches=1)
    assert notes[0].startswith(f"note: {path} was not computed from these calibration batches")
    importance.save_scores(fresh_b, path)  # an older star-elastic's file: no key
    rescored, notes = scores_for(b, run)
    assert "parent weights and calibration batches" in notes[0] and same(rescored, fresh_b)
    assert fingerprint(a) == fingerprint(tmp_path / "a_moved") != fingerprint(b)


def test_fingerprint_of_large_files_samples_them(tmp_path):
    """Above 4 MiB a file is fingerprinted by its size and 1,024 evenly spaced 4 KiB pieces: a copy
    has the same fingerprint, a change inside a piece is seen, and one between two pieces is not
    (the documented limit: 6 MiB / 1,023 ≈ 6 KiB from one piece's start to the next)."""
    g = torch.Generator().manual_seed(0)
    blob = torch.randint(0, 256, (6 * 2**20 + 5,), dtype=torch.uint8, generator=g).numpy().tobytes()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "w.bin").write_bytes(blob)
    shutil.copytree(tmp_path / "x", tmp_path / "y")
    assert fingerprint(tmp_path / "x") == fingerprint(tmp_path / "y")
    piece = 512 * (len(blob) - 4096) // 1023  # where piece 512 starts
    for at, seen in ((piece + 4095, True), (piece + 4096, False)):
        changed = bytearray(blob)
        changed[at] ^= 1
        (tmp_path / "y" / "w.bin").write_bytes(bytes(changed))
        assert (fingerprint(tmp_path / "x") != fingerprint(tmp_path / "y")) == seen


def test_resume_refuses_a_change_that_shapes_the_state_in_one_line(parents, tmp_path, capsys):
    a, b = parents
    run, job = tmp_path / "run", tmp_path / "job.yaml"
    base = {k: v for k, v in vars(config(a, run, steps=4, stop_after=2)).items()
            if k in ("model", "data", "out", "steps", "stop_after", "batch_size", "n_synthetic",
                     "calibration_batches", "router_fit_steps", "stage1_seq_len", "stage2_seq_len", "checkpoint_every")}
    job.write_text(yaml.safe_dump(base))
    assert main(["elastify", "--config", str(job)]) == 0
    before = digest(run)
    capsys.readouterr()
    for flags, expected in (
        (["--budgets", "1.0,0.6"], f"resume: elastic.budgets changed since {run} was started: [1.0, 0.75, 0.5] → "
                                   "[1.0, 0.6]; it shapes the trained state"),
        (["--seed", "1"], f"resume: seed changed since {run} was started: 0 → 1"),
        (["--steps", "5"], f"resume: steps changed since {run} was started: 4 → 5"),
        (["--model", str(b)], f"resume: model differs from the run's in {run}: {str(a)!r} (fingerprint"),
    ):
        assert main(["elastify", "--config", str(job), *flags, "--resume"]) == 2, flags
        one_line_error(capsys, expected)
    assert digest(run) == before
    notes = []  # when to stop and checkpoint, and the engine, may change
    resumed = train(from_dict(ElastifyConfig, base | {"resume": True, "stop_after": None, "checkpoint_every": 1,
                                                      "engine": {"parallel": "none"}}), log=notes.append)
    assert f"importance: reusing {run / 'importance.safetensors'}" in notes
    whole = train(from_dict(ElastifyConfig, base | {"out": str(tmp_path / "whole"), "stop_after": None}), log=quiet)
    assert resumed["finished"] and resumed["state_sha256"] == whole["state_sha256"]


def test_resume_without_a_checkpoint_is_an_error_and_auto_starts(parents, tmp_path):
    a, _ = parents
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="does not exist, so there is no checkpoint to resume from"):
        train(config(a, run, resume=True), log=quiet)
    assert not run.exists()
    auto = train(config(a, run, resume="auto"), log=quiet)  # nothing to resume: a new run
    plain = train(config(a, tmp_path / "plain"), log=quiet)
    assert auto["state_sha256"] == plain["state_sha256"]
    train(config(a, tmp_path / "stopped", stop_after=2), log=quiet)  # auto with a checkpoint: continues
    assert train(config(a, tmp_path / "stopped", resume="auto"), log=quiet)["state_sha256"] == plain["state_sha256"]
    zero = tmp_path / "zero"  # a run that wrote no checkpoint (0 steps write none)
    first = train(config(a, zero, steps=0), log=quiet)
    with pytest.raises(ConfigError, match=f"resume: {zero} has no checkpoint to resume from"):
        train(config(a, zero, steps=0, resume=True), log=quiet)
    notes = []
    again = train(config(a, zero, steps=0, resume="auto"), log=notes.append)
    assert f"resume auto: {zero} has no checkpoint; starting the run again" in notes
    assert f"importance: reusing {zero / 'importance.safetensors'}" in notes
    assert again["state_sha256"] == first["state_sha256"]
    with pytest.raises(ConfigError, match="resume must be true, false or auto, got 'sometimes'"):
        config(a, run, resume="sometimes")
    with pytest.raises(ConfigError, match="overwrite \\(start again\\) and resume 'auto' \\(continue\\) exclude"):
        config(a, run, resume="auto", overwrite=True)
    assert (config(a, run, resume="TRUE").resume, config(a, run, resume="false").resume) == (True, False)


def test_checks_of_config_and_grid_run_before_any_weights_load(parents, tmp_path, monkeypatch):
    import star_elastic.train.elastify as recipe

    def loaded(*args, **kwargs):
        raise AssertionError("weights loaded before the config was checked")

    monkeypatch.setattr(recipe, "load_model", loaded)
    monkeypatch.setattr(recipe, "meta_model", loaded)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="choice 40 for 'hidden' is outside 1..32"):
        train(config(parents[0], out, elastic={"choices": {"hidden": [40, 16]}}), log=quiet)
    with pytest.raises(ConfigError, match=r"elastify needs data: --data STORE \(a prepare-data folder\), "
                                          r"FILE.jsonl\|FILE.parquet, or --data synthetic"):
        train(from_dict(ElastifyConfig, {"model": str(parents[0]), "out": str(out)}), log=quiet)
    assert not out.exists()


@pytest.mark.parametrize("name", ["nemotron-3-nano-30b.yaml", "nemotron-nano-9b-v2.yaml"])
def test_real_model_recipes_need_data(parents, tmp_path, capsys, name):
    text = (CONFIGS / name).read_text()
    assert any("--data /" in line for line in text.splitlines() if line.startswith("#"))  # its header command
    assert "data" not in yaml.safe_load(text)
    assert main(["elastify", "--config", str(CONFIGS / name), "--model", str(parents[0]),
                 "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "elastify needs data: --data STORE (a prepare-data folder), FILE.jsonl|FILE.parquet")
    assert not (tmp_path / "run").exists()
