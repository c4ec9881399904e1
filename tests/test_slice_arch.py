"""`slice CKPT --arch`: explicit architectures cut from any sorted checkpoint, streamed.

References: the masked elastic forward of the full model (BF16 / fp32 and fake-quantized), the
in-memory packed slicer (quantize-then-slice bytes), and a count of the bytes the streaming
slicer holds at once.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from conftest import ELASTIC_TINY, randomize, tiny_config
from safetensors.torch import load_file

import star_elastic.slicing as slicing
from star_elastic import HybridLM, load_model
from star_elastic.cli import main
from star_elastic.config import ConfigError, QuantConfig
from star_elastic.elastic.arch import IndexSets, load_arch_file, parse_arch
from star_elastic.hf import save_model
from star_elastic.quant.export import quant_metadata, quantized_state, slice_packed, write_quantized
from test_quant_nested import quantized_elastic
from test_quant_vllm_exclusions import QCFGS, disagreements, export

ARCH = "hidden=48,attn_heads=2,mamba_heads=3,experts=5,expert_inter=16,shared_inter=32,mlp_inter=48,layers=0-4+6"


def all_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A random model saved in 6+ shards (the slicer does not care whether it was sorted)."""
    model = randomize(HybridLM(tiny_config(**ELASTIC_TINY)), seed=3, scale=0.2).eval()
    path = tmp_path_factory.mktemp("ckpt")
    save_model(model, path, max_shard_bytes=40_000)
    assert len(list(path.glob("model-*.safetensors"))) >= 6
    return model, path


def test_arch_slice_equals_masked_forward(parent, tmp_path, capsys):
    model, path = parent
    assert main(["slice", str(path), "--arch", ARCH, "--out", str(tmp_path / "s"), "--max-shard-gb", "0.00002"]) == 0
    arch = parse_arch(ARCH, model.config)
    assert arch.layers == (0, 1, 2, 3, 4, 6) and arch.mamba_heads == 3
    sliced = load_model(tmp_path / "s")
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()  # written in several shards
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(sliced(ids), model(ids, masks=IndexSets.prefix(model.config, arch).masks()),
                                   atol=1e-5, rtol=0)


def test_arch_file_writes_one_folder_per_variant(parent, tmp_path):
    model, path = parent
    variants = {"mid": {"hidden": 32, "experts": 6, "layers": [0, 1, 2, 3, 5, 6, 7]}, "small": "hidden=16,mamba_heads=2"}
    (tmp_path / "v.json").write_text(json.dumps(variants))
    assert main(["slice", str(path), "--arch-file", str(tmp_path / "v.json"), "--out", str(tmp_path / "out")]) == 0
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    for name, arch in load_arch_file(tmp_path / "v.json", model.config).items():
        with torch.no_grad():
            torch.testing.assert_close(load_model(tmp_path / "out" / name)(ids),
                                       model(ids, masks=IndexSets.prefix(model.config, arch).masks()), atol=1e-5, rtol=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mid", "small"]


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_quantized_arch_slice_equals_masked_and_quantize_then_slice(tmp_path, fmt):
    elastic, fq, qcfg, quantizers = quantized_elastic(fmt, seed=2)
    full = quantized_state(fq, qcfg, quantizers)
    write_quantized(tmp_path / "q", fq.config, full, quant_metadata(qcfg, fq.config))
    arch = parse_arch(ARCH, fq.config)
    assert main(["slice", str(tmp_path / "q"), "--arch", ARCH, "--out", str(tmp_path / "s")]) == 0
    on_disk = all_tensors(tmp_path / "s")
    in_memory = slice_packed(full, fq.config, arch, fmt)
    assert on_disk.keys() == in_memory.keys()
    for k, t in on_disk.items():  # bit for bit, whatever the dtype
        assert t.dtype == in_memory[k].dtype and torch.equal(t.reshape(-1).view(torch.uint8),
                                                             in_memory[k].reshape(-1).view(torch.uint8)), k
    ids = torch.randint(0, fq.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "s")(ids),
                                   fq(ids, masks=IndexSets.prefix(fq.config, arch).masks()), atol=1e-4, rtol=0)
    # exclusions rebuilt for the sliced config (layers renumbered), not copied from the input
    meta = json.loads((tmp_path / "s" / "hf_quant_config.json").read_text())["quantization"]
    assert meta["exclude_modules"] == quant_metadata(qcfg, arch.model_config(fq.config))["quantization"]["exclude_modules"]


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("which", sorted(QCFGS))
def test_quantized_arch_slice_exclusions_read_right_by_vllm_rule(tmp_path, fmt, which):
    """Whatever the input quantized (not only our default set), the slice's exclusions match its tensors."""
    qcfg = QuantConfig(format=fmt, **QCFGS[which])
    _, fq, tensors = export(fmt, qcfg)
    write_quantized(tmp_path / "q", fq.config, tensors, quant_metadata(qcfg, fq.config))
    assert main(["slice", str(tmp_path / "q"), "--arch", ARCH, "--out", str(tmp_path / "s")]) == 0
    meta = json.loads((tmp_path / "s" / "hf_quant_config.json").read_text())
    assert disagreements(all_tensors(tmp_path / "s"), meta) == []


def test_streaming_holds_one_input_tensor_and_one_output_shard(parent, tmp_path, monkeypatch):
    model, path = parent
    real_iter, held, peak = slicing.iter_tensors, [], [0]

    def counting_iter(src):  # bytes of yielded input tensors still alive when the next one is read
        for key, t, name in real_iter(src):
            alive = sum(n for ref, n in held if ref() is not None)
            peak[0] = max(peak[0], alive + t.numel() * t.element_size())
            held.append((weakref.ref(t), t.numel() * t.element_size()))
            yield key, t, name
            del t

    monkeypatch.setattr(slicing, "iter_tensors", counting_iter)
    shard = 30_000
    result = slicing.slice_checkpoint(path, parse_arch(ARCH, model.config), tmp_path / "s", max_shard_bytes=shard)
    inputs = [t.numel() * t.element_size() for t in all_tensors(path).values()]
    assert len(held) == len(inputs)  # every tensor read exactly once
    outputs = [t.numel() * t.element_size() for t in all_tensors(tmp_path / "s").values()]
    held_out = shard + max(outputs)  # a shard is flushed before the tensor that would overflow it
    assert result["peak_tensor_bytes"] <= held_out
    # alive inputs: the one being sliced, plus unsliced ones that sit in the output shard as they are
    assert peak[0] <= max(inputs) + held_out
    assert max(inputs) + 2 * held_out < 0.5 * sum(inputs), (max(inputs), held_out, sum(inputs))


def test_bad_arch_inputs(parent, tmp_path, capsys):
    model, path = parent
    cases = [
        (["--arch", "hidden=999"], "hidden=999 outside 1..64"),
        (["--arch", "heads=2"], "unknown axis 'heads'"),
        (["--arch", "experts=1"], "below top-k=2"),
        (["--arch", "layers=3-99"], "layers="),
        (["--arch-file", str(tmp_path / "missing.json")], "missing.json: cannot read"),
    ]
    for flags, message in cases:
        assert main(["slice", str(path), *flags, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()
    (tmp_path / "file").write_text("keep")
    assert main(["slice", str(path), "--arch", "hidden=16", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "keep"
    with pytest.raises(ConfigError, match="variant 'a'"):
        (tmp_path / "bad.json").write_text(json.dumps({"a": {"hidden": 0}}))
        load_arch_file(tmp_path / "bad.json", model.config)


@pytest.fixture(scope="module")
def parent_with_tokenizer(tmp_path_factory):
    from star_elastic.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = randomize(HybridLM(tiny_config(**ELASTIC_TINY, vocab_size=len(tok))), seed=5, scale=0.2).eval()
    model.tokenizer = tok
    path = tmp_path_factory.mktemp("tok_ckpt")
    save_model(model, path)
    return model, path


def two_phase_on_slices(think_dir, answer_dir, prompt, cap, answer_cap):
    """Budget control written out by hand on two independently sliced checkpoints."""
    from star_elastic.infer.generate import GenerationConfig, generate

    thinker, answerer = load_model(think_dir), load_model(answer_dir)
    tok = thinker.tokenizer
    think_end, eos = tok.convert_tokens_to_ids("</think>"), tok.eos_token_id
    trace = generate(thinker, [prompt], GenerationConfig(max_new_tokens=cap, stop_token_ids=(think_end, eos)))[0]
    if not trace or trace[-1] not in (think_end, eos):
        trace = trace + [think_end]
    answer = generate(answerer, [prompt + trace], GenerationConfig(max_new_tokens=answer_cap, stop_token_ids=(eos,)))[0]
    return trace, answer


def test_generate_with_explicit_variants_equals_sliced_checkpoints(parent_with_tokenizer, tmp_path, capsys):
    from star_elastic.data.tokenizer import format_prompt
    from star_elastic.infer.budget import ElasticServer

    model, path = parent_with_tokenizer
    variants = {"small": {"hidden": 32, "mamba_heads": 2, "experts": 4, "layers": [0, 1, 2, 4, 5, 7]},
                "mid": "hidden=48,expert_inter=16"}
    (tmp_path / "v.json").write_text(json.dumps(variants))
    assert main(["slice", str(path), "--arch-file", str(tmp_path / "v.json"), "--out", str(tmp_path / "sl")]) == 0
    tok = model.tokenizer
    text = "12+7="
    prompt = tok.encode(format_prompt(tok, text), add_special_tokens=False)
    for think, answer in (("small", "mid"), ("mid", "full")):
        capsys.readouterr()
        assert main(["generate", str(path), text, "--arch-file", str(tmp_path / "v.json"), "--think", think,
                     "--answer", answer, "--max-think-tokens", "10", "--max-answer-tokens", "6"]) == 0
        out = capsys.readouterr().out
        answer_dir = path if answer == "full" else tmp_path / "sl" / answer
        trace, ans = two_phase_on_slices(tmp_path / "sl" / think, answer_dir, prompt, 10, 6)
        assert out == "<think>" + "".join(tok.decode([t], skip_special_tokens=False) for t in trace + ans) + "\n"
    server = ElasticServer.from_checkpoint(path, load_arch_file(tmp_path / "v.json", model.config))
    assert server.variants == ["full", "small", "mid"]
    res = server.generate([prompt], "small", "mid", 10, 6).results[0]
    assert (res.think_tokens, res.answer_tokens) == two_phase_on_slices(tmp_path / "sl" / "small", tmp_path / "sl" / "mid",
                                                                        prompt, 10, 6)
    assert main(["generate", str(path), text, "--arch-file", str(tmp_path / "v.json"), "--think", "tiny"]) == 2
    assert "--think 'tiny' is not a variant of the architectures file; choose one of full, small, mid" in capsys.readouterr().err


def test_checkpoint_that_disagrees_with_its_config_is_refused(parent, tmp_path, capsys):
    from safetensors.torch import save_file

    model, path = parent
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    tensors = all_tensors(path)
    tensors["backbone.layers.4.mixer.up_proj.weight"] = torch.zeros(80, 64)  # config says (64, 64)
    save_file(tensors, str(broken / "model.safetensors"))
    assert main(["slice", str(broken), "--arch", "hidden=32", "--out", str(tmp_path / "a")]) == 2
    assert "'backbone.layers.4.mixer.up_proj.weight' has shape (80, 64), expected (64, 64)" in capsys.readouterr().err
    del tensors["backbone.layers.4.mixer.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    assert main(["slice", str(broken), "--arch", "hidden=32", "--out", str(tmp_path / "b")]) == 2
    assert "missing tensor 'backbone.layers.4.mixer.up_proj.weight'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not list(tmp_path.glob(".*partial"))


def test_eval_with_explicit_variants_counts_the_sliced_checkpoints_tokens(parent_with_tokenizer, tmp_path, capsys):
    from star_elastic.data.tokenizer import format_prompt

    model, path = parent_with_tokenizer
    (tmp_path / "v.json").write_text(json.dumps({"small": "hidden=32,experts=4", "mid": {"mamba_heads": 2}}))
    assert main(["slice", str(path), "--arch-file", str(tmp_path / "v.json"), "--out", str(tmp_path / "sl")]) == 0
    rows = [{"prompt": "3+4=", "answer": "7"}, {"prompt": "9-2=", "answer": "7"}]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["eval", str(path), "--arch-file", str(tmp_path / "v.json"), "--think", "small",
                 "--answer", "mid", "--data", str(tmp_path / "e.jsonl"), "--max-think-tokens", "6",
                 "--max-answer-tokens", "24"]) == 0
    point = json.loads(capsys.readouterr().out)[0]
    tok = model.tokenizer
    runs = [two_phase_on_slices(tmp_path / "sl" / "small", tmp_path / "sl" / "mid",
                                tok.encode(format_prompt(tok, r["prompt"]), add_special_tokens=False), 6, 24) for r in rows]
    assert (point["think_budget"], point["answer_budget"], point["n"]) == ("small", "mid", 2)
    assert point["think_tokens"] == sum(len(t) for t, _ in runs) / 2
    assert point["answer_tokens"] == sum(len(a) for _, a in runs) / 2
    capsys.readouterr()
    assert main(["eval", str(path), "--arch-file", str(tmp_path / "v.json"), "--data", str(tmp_path / "e.jsonl"),
                 "--sweep", "6", "--max-answer-tokens", "3"]) == 0  # the sweep honours the answer cap too
    points = {(p["think_budget"], p["answer_budget"]): p for p in json.loads(capsys.readouterr().out)["points"]}
    assert len(points) == 9
    for think, answer in (("small", "mid"), ("mid", "mid")):
        runs = [two_phase_on_slices(tmp_path / "sl" / think, tmp_path / "sl" / answer,
                                    tok.encode(format_prompt(tok, r["prompt"]), add_special_tokens=False), 6, 3)
                for r in rows]
        assert points[think, answer]["think_tokens"] == sum(len(t) for t, _ in runs) / 2
        assert points[think, answer]["answer_tokens"] == sum(len(a) for _, a in runs) / 2
