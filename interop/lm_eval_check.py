"""lm-eval-harness (`--model hf`) on a slice generates exactly what star_elastic generates.

    python interop/lm_eval_check.py SAMPLES.jsonl SLICE_DIR

SAMPLES.jsonl is lm-eval's `--log_samples` output of interop/lm_eval/star_elastic_demo.yaml on
SLICE_DIR. For every document, star_elastic's greedy continuation of the same prompt (stopped at
eos, the task's token budget) decoded with skip_special_tokens=True, as lm-eval decodes, must
equal lm-eval's response, and the answer lm-eval's filter takes after `</think>` must be what
our demo evaluator parses.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from star_elastic import load_model
from star_elastic.data import synthetic
from star_elastic.infer.generate import GenerationConfig, generate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples", type=Path)
    ap.add_argument("slice", type=Path)
    a = ap.parse_args()
    rows = [json.loads(line) for line in a.samples.read_text().splitlines()]
    model = load_model(a.slice, dtype=torch.float32)
    tok = model.tokenizer
    args = rows[0]["arguments"]["gen_args_0"]["arg_1"]
    prompts = [tok.encode(r["arguments"]["gen_args_0"]["arg_0"], add_special_tokens=False) for r in rows]
    cfg = GenerationConfig(max_new_tokens=args["max_gen_toks"], stop_token_ids=(tok.eos_token_id,))
    with torch.no_grad():
        outs = generate(model, prompts, cfg)
    same_text = same_answer = 0
    for r, out in zip(rows, outs):
        ours = tok.decode(out, skip_special_tokens=True)
        theirs = r["resps"][0][0]
        same_text += ours == theirs
        ours_answer = synthetic.parse_answer("<think>" + tok.decode(out, skip_special_tokens=False))
        theirs_answer = None if r["filtered_resps"][0] == "[no </think>]" else r["filtered_resps"][0].strip()
        same_answer += ours_answer == theirs_answer
    print(f"lm-eval vs star_elastic on {a.slice}: same generated text {same_text}/{len(rows)}, "
          f"same parsed answer {same_answer}/{len(rows)}")
    return 0 if same_text == same_answer == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
