"""Elastic budget control (paper, pipeline point 8): one submodel thinks, another answers.

Phase 1: the `think_budget` submodel decodes the trace until it emits `</think>` (or eos), or
until `max_think_tokens`, where `</think>` is forced (the parent's default budget control).
Phase 2: the `answer_budget` submodel prefills prompt + trace in one pass and decodes the answer
(also when both budgets are the same: a batched phase 1 has fed padding to rows that finished
early, so its cache is not the trace's).
Every submodel is a view of the one set of elastic weights (`star_elastic.infer.views`), built
once per budget and cached.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from star_elastic.config import ConfigError
from star_elastic.infer.generate import GenerationConfig, decode, prefill
from star_elastic.infer.views import view_model
from star_elastic.model.hybrid import HybridLM


@dataclasses.dataclass
class PhaseResult:
    think_tokens: list[int]
    answer_tokens: list[int]
    forced_end_of_think: bool


@dataclasses.dataclass
class BudgetRun:
    """Outputs of one batch and the wall time of each phase."""

    results: list[PhaseResult]
    think_seconds: float
    answer_seconds: float


class ElasticServer:
    """Submodels of an ElasticLM by budget, all sharing the elastic weights."""

    def __init__(self, elastic, think_end_id: int, eos_id: int):
        self.elastic, self.think_end_id, self.eos_id = elastic, think_end_id, eos_id
        self._models: dict[float, HybridLM] = {}

    @classmethod
    def from_elastic(cls, elastic) -> ElasticServer:
        tok = elastic.model.tokenizer
        if tok is None:
            raise ConfigError("budget control needs the run's tokenizer (for </think> and eos)")
        think_end = tok.convert_tokens_to_ids("</think>")
        if think_end is None or think_end == tok.unk_token_id:
            raise ConfigError("the tokenizer has no '</think>' token")
        return cls(elastic, think_end, tok.eos_token_id)

    def model(self, budget: float) -> HybridLM:
        if budget not in self._models:
            self._models[budget] = view_model(self.elastic.model, self.elastic.architecture(budget))
        return self._models[budget]

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        think_budget: float,
        answer_budget: float,
        max_think_tokens: int = 256,
        max_answer_tokens: int = 32,
        on_token: Callable[[str, int, int], None] | None = None,
    ) -> BudgetRun:
        """prompts end inside the assistant turn, right after `<think>`."""
        thinker, answerer = self.model(think_budget), self.model(answer_budget)
        t0 = time.perf_counter()
        cache, logits = prefill(thinker, prompts)
        think_cfg = GenerationConfig(max_new_tokens=max_think_tokens, stop_token_ids=(self.think_end_id, self.eos_id))
        traces = decode(thinker, cache, logits, think_cfg,
                        on_token=None if on_token is None else lambda i, t: on_token("think", i, t))
        forced = []
        for trace in traces:
            ended = bool(trace) and trace[-1] in (self.think_end_id, self.eos_id)
            forced.append(not ended)
            if not ended:  # budget exhausted: close the trace ourselves
                trace.append(self.think_end_id)
                if on_token is not None:
                    on_token("think", len(forced) - 1, self.think_end_id)
        t1 = time.perf_counter()
        answer_cfg = GenerationConfig(max_new_tokens=max_answer_tokens, stop_token_ids=(self.eos_id,))
        cache, logits = prefill(answerer, [list(p) + t for p, t in zip(prompts, traces)])
        answers = decode(answerer, cache, logits, answer_cfg,
                         on_token=None if on_token is None else lambda i, t: on_token("answer", i, t))
        t2 = time.perf_counter()
        results = [PhaseResult(t, a, f) for t, a, f in zip(traces, answers, forced)]
        return BudgetRun(results, t1 - t0, t2 - t1)
