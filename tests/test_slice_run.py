"""`slice RUN --budget B`: the router's architecture, streamed through the `--arch` writer.

References: the in-memory slicers (`arch.slice_model` for BF16 / fp32, `export.slice_packed` for
packed FP8 / NVFP4) on the whole model, the unsharded slice, a single-file copy of a sharded run,
and `slice --arch` given the same architecture.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_elastic
from safetensors.torch import load_file
from test_quant_nested import quantized_elastic

from star_elastic.cli import main
from star_elastic.elastic.arch import Architecture, slice_model
from star_elastic.elastic.run import read_run_metadata, save_run
from star_elastic.hf import INDEX, WEIGHTS, ShardWriter, to_disk_state
from star_elastic.quant.export import quantized_state, slice_packed
from star_elastic.quant.qad import write_qrun

BUDGET = 0.5


def shard_tensors(path) -> list[dict[str, torch.Tensor]]:
    """The tensors of each weight file of a checkpoint folder, file by file."""
    return [load_file(f) for f in sorted(path.glob("*.safetensors"))]


def all_tensors(path) -> dict[str, torch.Tensor]:
    return {k: t for shard in shard_tensors(path) for k, t in shard.items()}


def assert_bytes_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, t in a.items():
        assert t.dtype == b[k].dtype and t.shape == b[k].shape, k
        assert torch.equal(t.reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def arch_text(arch: Architecture) -> str:
    """An Architecture in `--arch` syntax (layers as single indices joined by '+')."""
    sizes = {k: v for k, v in arch.to_dict().items() if k != "layers"}
    return ",".join(f"{k}={v}" for k, v in sizes.items()) + ",layers=" + "+".join(map(str, arch.layers))


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    elastic = tiny_elastic(seed=4)
    run = tmp_path_factory.mktemp("run")
    save_run(elastic, run)
    return elastic, run


@pytest.fixture(scope="module", params=["fp8", "nvfp4"])
def quantized_run(request, tmp_path_factory):
    """A QRUN as `quantize` writes it (single model.safetensors), and its full packed tensors."""
    elastic, fq, qcfg, quantizers = quantized_elastic(request.param, seed=3)
    root = tmp_path_factory.mktemp(f"qrun-{request.param}")
    save_run(elastic, root / "run")
    write_qrun(root / "run", root / "qrun", fq, qcfg, quantizers, read_run_metadata(root / "run"))
    return elastic, root / "qrun", quantized_state(fq, qcfg, quantizers), request.param


def test_budget_slice_is_sharded_under_max_shard_gb_and_equals_the_in_memory_slice(bf16_run, tmp_path, capsys):
    elastic, run = bf16_run
    arch = elastic.architecture(BUDGET)
    reference = to_disk_state(slice_model(elastic.model, arch))
    limit_gb = 0.00004  # about 43 kB: over ten shards of this 0.5 MB slice
    limit = limit_gb * 2**30
    assert max(t.numel() * t.element_size() for t in reference.values()) <= limit  # every tensor fits a shard

    assert main(["slice", str(run), "--budget", str(BUDGET), "--out", str(tmp_path / "sharded"),
                 "--max-shard-gb", str(limit_gb), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    shards = shard_tensors(tmp_path / "sharded")
    assert len(shards) >= 10 and not (tmp_path / "sharded" / WEIGHTS).exists()
    assert all(sum(t.numel() * t.element_size() for t in s.values()) <= limit for s in shards)
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())["weight_map"]
    assert sorted(set(index.values())) == sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))

    assert main(["slice", str(run), "--budget", str(BUDGET), "--out", str(tmp_path / "whole")]) == 0
    assert [p.name for p in (tmp_path / "whole").glob("*.safetensors")] == [WEIGHTS]
    assert_bytes_equal(all_tensors(tmp_path / "sharded"), all_tensors(tmp_path / "whole"))
    assert_bytes_equal(all_tensors(tmp_path / "sharded"), reference)

    described = elastic.describe(BUDGET)  # what the CLI prints comes from the router's own account
    for key in ("budget_type", "total_params", "active_params", "total_fraction", "active_fraction", "target",
                "achieved", "held", "architecture"):
        assert info[key] == described[key], key
    assert info["bytes"] == sum(t.numel() * t.element_size() for t in reference.values())
    assert json.loads((tmp_path / "sharded" / "config.json").read_text()) == \
        json.loads((tmp_path / "whole" / "config.json").read_text())


def test_bad_max_shard_gb_is_refused_for_budget_too(bf16_run, tmp_path, capsys):
    _, run = bf16_run
    assert main(["slice", str(run), "--budget", str(BUDGET), "--out", str(tmp_path / "x"), "--max-shard-gb", "0"]) == 2
    assert "--max-shard-gb 0.0: must be positive" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_budget_slice_equals_arch_slice_of_the_same_architecture(bf16_run, tmp_path):
    elastic, run = bf16_run
    for budget in elastic.ecfg.budgets:
        text = arch_text(elastic.architecture(budget))
        assert main(["slice", str(run), "--budget", str(budget), "--out", str(tmp_path / f"b{budget}")]) == 0
        assert main(["slice", str(run), "--arch", text, "--out", str(tmp_path / f"a{budget}")]) == 0
        assert_bytes_equal(all_tensors(tmp_path / f"b{budget}"), all_tensors(tmp_path / f"a{budget}"))
        for name in ("config.json", "generation_config.json"):
            assert (tmp_path / f"b{budget}" / name).read_text() == (tmp_path / f"a{budget}" / name).read_text()


def test_quantized_run_in_several_shards_slices_like_its_single_file_copy(quantized_run, tmp_path):
    elastic, qrun, full, fmt = quantized_run
    sharded = tmp_path / "qrun-sharded"
    shutil.copytree(qrun, sharded)
    (sharded / "model" / WEIGHTS).unlink()
    writer = ShardWriter(sharded / "model", max_bytes=8_000)
    for key, t in load_file(qrun / "model" / WEIGHTS).items():
        writer.add(key, t)
    writer.close()
    assert len(list((sharded / "model").glob("model-*.safetensors"))) >= 4

    for src, out in ((qrun, tmp_path / "from-one"), (sharded, tmp_path / "from-shards")):
        assert main(["slice", str(src), "--budget", str(BUDGET), "--out", str(out)]) == 0
    assert_bytes_equal(all_tensors(tmp_path / "from-shards"), all_tensors(tmp_path / "from-one"))
    arch = elastic.architecture(BUDGET)
    assert_bytes_equal(all_tensors(tmp_path / "from-shards"), slice_packed(full, elastic.config, arch, fmt))
    for name in ("config.json", "hf_quant_config.json"):
        assert (tmp_path / "from-shards" / name).read_text() == (tmp_path / "from-one" / name).read_text()


def test_quantized_budget_slice_equals_arch_slice(quantized_run, tmp_path):
    elastic, qrun, _, _ = quantized_run
    text = arch_text(elastic.architecture(BUDGET))
    assert main(["slice", str(qrun), "--budget", str(BUDGET), "--out", str(tmp_path / "b")]) == 0
    assert main(["slice", str(qrun), "--arch", text, "--out", str(tmp_path / "a")]) == 0
    assert_bytes_equal(all_tensors(tmp_path / "b"), all_tensors(tmp_path / "a"))
    for name in ("config.json", "hf_quant_config.json"):
        assert (tmp_path / "b" / name).read_text() == (tmp_path / "a" / name).read_text()
