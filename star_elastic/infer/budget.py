"""Elastic budget control (paper, pipeline point 8): one submodel thinks, another answers.

Phase 1: the `think_budget` submodel decodes the trace until it emits `</think>` (or eos), or
until `max_think_tokens`, where `</think>` is forced (the parent's default budget control).
Phase 2: the `answer_budget` submodel prefills prompt + trace in one pass and decodes the answer.
When both budgets are the same submodel, the answer instead continues the trace's own cache in
place (`answer_in_place`: no second prefill; the row feeds the trace's last token, and `</think>`
where it was forced, then decodes the answer in the same batch).
The phases are built per request (`think_row`, `close_trace`, `answer_row`) so that `generate`
here and the HTTP server's scheduler (`star_elastic.serve`) run the same protocol on the same
`DecodeBatch` step.
Every submodel is a view of the one set of elastic weights (`star_elastic.infer.views`), built
once per budget and cached.

A submodel is named by a router budget (float, elastic run folders) or by a variant name (str):
`ElasticServer.from_checkpoint(path, {"23b": Architecture, ...})` serves explicit architectures
of any sorted checkpoint that has no router (e.g. NVIDIA's Elastic checkpoints). What a command or
a request may name is decided by `resolve`, for `generate`, `eval` and `serve` alike.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import torch

from star_elastic.config import ConfigError, ModelConfig, typed_blocks
from star_elastic.elastic.arch import Architecture, load_arch_file
from star_elastic.elastic.run import load_elastic
from star_elastic.hf import load_model
from star_elastic.infer.generate import DecodeBatch, GenerationConfig, Row, decode_to_end
from star_elastic.infer.views import view_model
from star_elastic.model.hybrid import HybridLM
from star_elastic.runtime import check_device, resolve_device
from star_elastic.slicing import checkpoint_dir


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


@dataclasses.dataclass
class PhaseConfig:
    """Which submodel thinks, which answers, and their caps: the same keys and defaults for
    `generate`, `eval` and `serve` (a request to the server may override each)."""

    think: float | str | None = None
    """The submodel that writes the <think> trace: a trained budget of the run (e.g. 0.5), or a variant
    name of --arch-file. Default: the largest (the parent)."""
    answer: float | str | None = None
    """The submodel that writes the answer, named as --think. Default: the largest."""
    max_think_tokens: int = 256
    """Cap on the trace; </think> is forced when it is reached."""
    max_answer_tokens: int = 64
    """Cap on the answer."""

    def __post_init__(self) -> None:
        if self.max_think_tokens < 0 or self.max_answer_tokens < 1:
            raise ConfigError(f"need max_think_tokens >= 0 and max_answer_tokens >= 1, got "
                              f"{self.max_think_tokens} and {self.max_answer_tokens}")

    def submodels(self, variants: Sequence[float | str]) -> tuple[float | str, float | str]:
        """The think and answer submodels among `variants` (`resolve`, naming --think / --answer)."""
        return resolve(self.think, variants, "--think"), resolve(self.answer, variants, "--answer")


@dataclasses.dataclass
class GenerateConfig:
    """`star-elastic generate`: one prompt, budget-controlled."""

    run: str = ""
    """An elastic run folder, or a sorted checkpoint folder with --arch-file."""
    prompt: str = ""
    """The user message."""
    arch_file: str | None = None
    """Explicit architectures instead of the router: JSON {"12b": {"hidden": 1536, ...}, ...} as for slice;
    their names are what --think / --answer take ("full" is always there)."""
    phases: PhaseConfig = dataclasses.field(default_factory=PhaseConfig)
    """Think and answer submodels and caps."""
    device: str = "auto"
    """auto (CUDA where present), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        typed_blocks(self)
        check_device(self.device)
        if not self.run:
            raise ConfigError("generate needs RUN_OR_CKPT")


def variant_label(key: float | str) -> str:
    """A budget as a person writes it (0.5, 1), a variant name as it is."""
    return f"{key:g}" if isinstance(key, float) else str(key)


def resolve(key: float | str | None, variants: Sequence[float | str], field: str) -> float | str:
    """What a command or a request may name, in one place (`generate`, `eval`, `serve` and each
    request to the server): one of `variants`, the trained budgets (numbers; an int names the
    float equal to it) or the variant names of explicit architectures; None is the first (the
    largest). Budgets between the trained ones are not served: only trained budgets are held to
    their cost. Anything else is a ConfigError naming `field`, the value and the choices."""
    if key is None:
        return variants[0]
    for v in variants:
        if _names(key, v):
            return v
    shown = ", ".join(variant_label(v) for v in variants)
    kind = "a variant of the architectures file" if isinstance(variants[0], str) else "a trained budget"
    raise ConfigError(f"{field} {key!r} is not {kind}; choose one of {shown}")


def _names(key, variant: float | str) -> bool:
    """Whether `key` is `variant`: the same name, or the same number exactly (text is not a number here)."""
    if isinstance(key, bool):
        return False
    if isinstance(variant, str):
        return key == variant
    return isinstance(key, (int, float)) and key == variant


class ElasticServer:
    """Submodels by budget (router) or by variant name (explicit architectures), all views of one parent."""

    def __init__(self, elastic, think_end_id: int, eos_id: int, archs: dict[str, Architecture] | None = None,
                 parent: HybridLM | None = None):
        self.elastic, self.think_end_id, self.eos_id = elastic, think_end_id, eos_id
        self.parent = parent if parent is not None else elastic.model
        self.archs = dict(archs or {})
        self._models: dict[float | str, HybridLM] = {}

    @classmethod
    def from_elastic(cls, elastic) -> ElasticServer:
        return cls(elastic, *_think_and_eos(elastic.model.tokenizer))

    @classmethod
    def from_checkpoint(cls, path, archs: dict[str, Architecture], device="cpu") -> ElasticServer:
        """A sorted checkpoint without a router: submodels named by `archs` (plus "full")."""
        parent = load_model(path, device=device)
        for arch in archs.values():
            arch.validate(parent.config)
        named = {"full": Architecture.full(parent.config)} | dict(archs)
        return cls(None, *_think_and_eos(parent.tokenizer), archs=named, parent=parent)

    @property
    def variants(self) -> list[float | str]:
        """What `model()` accepts: the trained budgets, or the architecture names ("full" first)."""
        return list(self.archs) if self.elastic is None else list(self.elastic.ecfg.budgets)

    def architecture(self, key: float | str) -> Architecture:
        if isinstance(key, str):
            if key not in self.archs:
                raise ConfigError(f"unknown variant {key!r}; known: {', '.join(self.archs) or 'none (give --arch-file)'}")
            return self.archs[key]
        if self.elastic is None:
            raise ConfigError(f"budget {key:g} needs a router (an elastic run); this checkpoint has variants "
                              f"{', '.join(self.archs)}")
        return self.elastic.architecture(key)

    def model(self, key: float | str) -> HybridLM:
        if key not in self._models:
            self._models[key] = view_model(self.parent, self.architecture(key))
        return self._models[key]

    def think_row(self, prompt: Sequence[int], max_think_tokens: int, sampling: GenerationConfig | None = None,
                  generator: torch.Generator | None = None, on_token=None) -> Row:
        """Phase 1 of one request: decode the trace until </think> or eos, at most `max_think_tokens`.

        `sampling` gives temperature / top_p (its stop strings apply to the answer only)."""
        base = sampling or GenerationConfig()
        cfg = dataclasses.replace(base, max_new_tokens=max_think_tokens, stop_token_ids=(self.think_end_id, self.eos_id),
                                  stop_strings=())
        return Row(list(prompt), cfg, generator, on_token)

    def close_trace(self, think: Row) -> bool:
        """Force </think> onto a trace that hit the cap; True when forced."""
        if think.tokens and think.tokens[-1] in (self.think_end_id, self.eos_id):
            return False
        think.tokens.append(self.think_end_id)
        if think.on_token is not None:
            think.on_token(self.think_end_id)
        return True

    def answer_row(self, think: Row, max_answer_tokens: int, sampling: GenerationConfig | None = None,
                   on_token=None) -> Row:
        """Phase 2: prompt + closed trace, re-prefilled by the answer model, decoded until eos."""
        base = sampling or GenerationConfig()
        cfg = dataclasses.replace(base, max_new_tokens=max_answer_tokens, stop_token_ids=(self.eos_id,))
        return Row(think.prompt + think.tokens, cfg, think.generator, on_token)

    def answer_in_place(self, think: Row, max_answer_tokens: int, sampling: GenerationConfig | None = None,
                        on_token=None) -> tuple[bool, Row] | None:
        """Phase 2 on the think model's own cache (think budget == answer budget): close the finished
        trace (`close_trace`) and return (forced, answer row). The row takes the think row's place in
        its batch and first feeds what that cache has not seen: the trace's last sampled token, and
        the forced `</think>`. None, trace left open, when the answer may have no tokens (it then
        goes through `close_trace`, `answer_row` and a prefill)."""
        if max_answer_tokens == 0:
            return None
        forced = self.close_trace(think)
        row = self.answer_row(think, max_answer_tokens, sampling, on_token)
        row.forced = list(think.tokens[-(2 if forced else 1):])
        return forced, row

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        think_budget: float | str,
        answer_budget: float | str,
        max_think_tokens: int = 256,
        max_answer_tokens: int = 32,
        on_token: Callable[[str, int, int], None] | None = None,
    ) -> BudgetRun:
        """prompts end inside the assistant turn, right after `<think>`; budgets are budgets or variant names."""
        def tap(phase: str, i: int):
            return None if on_token is None else functools.partial(on_token, phase, i)

        t0 = time.perf_counter()
        if think_budget == answer_budget:
            thinks = [self.think_row(p, max_think_tokens, on_token=tap("think", i)) for i, p in enumerate(prompts)]
            return self._generate_in_place(thinks, think_budget, max_answer_tokens, tap, t0)
        thinks, forced = self.think(prompts, think_budget, max_think_tokens, tap)
        t1 = time.perf_counter()
        answers = self.answer(thinks, answer_budget, max_answer_tokens, tap)
        t2 = time.perf_counter()
        results = [PhaseResult(t.tokens, a.tokens, f) for t, a, f in zip(thinks, answers, forced)]
        return BudgetRun(results, t1 - t0, t2 - t1)

    @torch.inference_mode()
    def think(self, prompts: Sequence[Sequence[int]], budget: float | str, max_think_tokens: int,
              tap=lambda phase, i: None) -> tuple[list[Row], list[bool]]:
        """Phase 1 of a batch on its own: the closed traces (rows whose tokens end with `</think>`
        or eos) and whether each `</think>` was forced. A trace can be answered by several budgets
        (`answer` leaves it as it is)."""
        thinks = [self.think_row(p, max_think_tokens, on_token=tap("think", i)) for i, p in enumerate(prompts)]
        batch = DecodeBatch(self.model(budget))
        batch.join(thinks)
        decode_to_end(batch)
        return thinks, [self.close_trace(t) for t in thinks]

    @torch.inference_mode()
    def answer(self, thinks: Sequence[Row], budget: float | str, max_answer_tokens: int,
               tap=lambda phase, i: None) -> list[Row]:
        """Phase 2 of a batch of closed traces: prompt + trace prefilled by `budget`'s model."""
        answers = [self.answer_row(t, max_answer_tokens, on_token=tap("answer", i)) for i, t in enumerate(thinks)]
        batch = DecodeBatch(self.model(budget))
        batch.join(answers)
        decode_to_end(batch)
        return answers

    def _generate_in_place(self, thinks: list[Row], budget: float | str, max_answer_tokens: int, tap,
                           t0: float) -> BudgetRun:
        """One batch: each answer continues its trace's cache (`answer_in_place`) where it can, or
        is prefilled into the batch after the step (a trace that never decoded, an empty answer);
        the think time ends when the last trace closes."""
        index = {id(t): i for i, t in enumerate(thinks)}
        answers: list[Row | None] = [None] * len(thinks)
        forced = [False] * len(thinks)
        open_traces, t1 = len(thinks), t0

        def closed(i: int, forced_end: bool, answer: Row) -> Row:
            nonlocal open_traces, t1
            forced[i], answers[i] = forced_end, answer
            open_traces -= 1
            if open_traces == 0:
                t1 = time.perf_counter()
            return answer

        def prefilled(i: int) -> Row:
            forced_end = self.close_trace(thinks[i])
            return closed(i, forced_end, self.answer_row(thinks[i], max_answer_tokens, on_token=tap("answer", i)))

        def continuation(row: Row) -> Row | None:
            i = index.get(id(row))
            done = None if i is None else self.answer_in_place(row, max_answer_tokens, on_token=tap("answer", i))
            return None if done is None else closed(i, *done)

        batch = DecodeBatch(self.model(budget), continuation=continuation)
        batch.join(thinks)
        pending = [i for i, t in enumerate(thinks) if t.finish is not None]  # no think tokens to decode
        while True:
            batch.join([prefilled(i) for i in pending])
            if not batch.rows:
                break
            pending = [index[id(r)] for r in batch.step() if id(r) in index and answers[index[id(r)]] is None]
        t2 = time.perf_counter()
        results = [PhaseResult(t.tokens, a.tokens, f) for t, a, f in zip(thinks, answers, forced)]
        return BudgetRun(results, t1 - t0, t2 - t1)


def open_server(run, arch_file: str | None = None, device: str = "auto") -> ElasticServer:
    """An elastic run folder (router budgets), or a sorted checkpoint (or a run's weights) served
    as the named architectures of `arch_file`, on `device`."""
    where = resolve_device(device)
    if arch_file is None:
        return ElasticServer.from_elastic(load_elastic(run, device=where))
    ckpt = checkpoint_dir(run)
    archs = load_arch_file(arch_file, ModelConfig.from_json(ckpt / "config.json"))
    return ElasticServer.from_checkpoint(ckpt, archs, device=where)


def _think_and_eos(tok) -> tuple[int, int]:
    if tok is None:
        raise ConfigError("budget control needs the model's tokenizer (for </think> and eos)")
    think_end = tok.convert_tokens_to_ids("</think>")
    if think_end is None or think_end == tok.unk_token_id:
        raise ConfigError("the tokenizer has no '</think>' token")
    return think_end, tok.eos_token_id
