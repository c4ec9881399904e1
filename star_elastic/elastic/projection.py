"""Budgets that hold: the final architecture of every trained budget, projected onto the choice grid.

Gumbel training leaves the router's argmax near, not at, its target (distillation pulls towards
larger models: 0.75 → 0.818 of active parameters on the demo). So after the router is fitted, and
again after training, each trained budget gets the architecture the router scores highest
(Σ over axes of the log-probability of the choice; ties to the larger model) among those whose
relative cost lies in the budget's window:

    band     target·(1 − tol) ≤ cost ≤ target·(1 + tol)          (default, tol = 0.02)
    ceiling  target·(1 − 2·tol) ≤ cost ≤ target                   (never above the target)
    none     cost = target: only the router fit's picks are projected, onto the closest architecture
             (the behaviour before budgets were held; training's drift is kept)

The search is exact: every architecture of the grid is costed in batched chunks. Where the grid
has nothing in a window, the closest architecture is taken (never above the target in ceiling
mode) and reported as not held. With `nested`, the budgets' architectures form a chain (a smaller
budget keeps a prefix of a larger one's components on every axis: a larger choice index on every
axis), chosen jointly: fewest and smallest misses first, then the summed router score (a chain
search over each budget's MAX_CANDIDATES best architectures). `router.settle_router` then teaches
the router these picks, so the router's
argmax — the one thing `ElasticLM.picks`, run.json, describe, slicing, views and the server read —
is the projected architecture.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from star_elastic.config import ConfigError

MAX_GRID = 1 << 22
"""Largest choice grid searched exactly (architectures)."""
CHUNK = 1 << 14
MAX_CANDIDATES = 1024
"""In-window architectures kept per budget (best router score first) for the nested chain search."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The settled architecture of one trained budget."""

    picks: dict[str, int]
    target: float
    achieved: float
    """Relative cost of `picks` (1.0 = the full model), in the run's budget type."""
    held: bool
    """True when `achieved` lies in the budget's window (else it is the grid's closest)."""


def window(mode: str, tol: float) -> tuple[float, float]:
    """Allowed relative deviation `cost / target − 1` of the final architecture."""
    return {"band": (-tol, tol), "ceiling": (-2 * tol, 0.0), "none": (0.0, 0.0)}[mode]


def dead_zone(mode: str, tol: float) -> tuple[float, float]:
    """Inner half of the window: the training loss is zero here, so sampled picks stay well inside."""
    lo, hi = window(mode, tol)
    quarter = (hi - lo) / 4
    return lo + quarter, hi - quarter


def grid_chunks(space):
    """Every architecture of the choice grid as (N, n_axes) choice indices, in chunks."""
    sizes = [len(space.choices[a]) for a in space.axes]
    total = math.prod(sizes)
    if total > MAX_GRID:
        raise ConfigError(f"the choice grid has {total:,} architectures; budgets are projected by exact search over "
                          f"at most {MAX_GRID:,}: use fewer elastic axes or fewer choices per axis")
    for start in range(0, total, CHUNK):
        flat, cols = torch.arange(start, min(total, start + CHUNK)), []
        for n in sizes:
            cols.append(flat % n)
            flat = flat // n
        yield torch.stack(cols, 1)


def grid_costs(cost_model, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, n_axes) choice indices → relative cost (N,) and relative total parameters (N,)."""
    space = cost_model.space
    picks = {a: F.one_hot(idx[:, j], len(space.choices[a])).double() for j, a in enumerate(space.axes)}
    return cost_model.relative(picks).detach(), cost_model.capacity(picks).detach()


def closest_achievable(cost_model, budget: float) -> float:
    """Relative cost of the grid architecture closest to `budget`."""
    best = math.inf
    for idx in grid_chunks(cost_model.space):
        rel, _ = grid_costs(cost_model, idx)
        near = float(rel[(rel - budget).abs().argmin()])
        best = near if abs(near - budget) < abs(best - budget) else best
    return best


@dataclasses.dataclass
class _Candidates:
    idx: torch.Tensor  # (K, n_axes) choice indices
    rel: torch.Tensor  # (K,) relative cost
    miss: torch.Tensor  # (K,) distance of cost / target − 1 outside the window (0 inside)
    value: torch.Tensor  # (K,) router score + a capacity tie-break − MISS_PENALTY · miss


MISS_PENALTY = 1e9
"""Any miss of the window outweighs any router score: in-window first, then the smallest miss."""


def _candidates(cost_model, budget: float, log_probs: dict[str, torch.Tensor]) -> _Candidates:
    """The best-valued architectures of one budget: in-window ones first (by router score), then the
    closest misses. In ceiling mode nothing above the target is ever a candidate."""
    ecfg, space = cost_model.ecfg, cost_model.space
    lo, hi = window(ecfg.budget_mode, ecfg.budget_tolerance)
    keep = _Candidates(torch.empty(0, len(space.axes), dtype=torch.long), *torch.empty(3, 0, dtype=torch.float64))
    for idx in grid_chunks(space):
        rel, cap = grid_costs(cost_model, idx)
        dev = rel / budget - 1
        miss = (lo - dev).clamp_min(0) + (dev - hi).clamp_min(0)
        miss = miss.where(miss > 1e-9, torch.zeros_like(miss))
        value = sum(log_probs[a].double()[idx[:, j]] for j, a in enumerate(space.axes)) + 1e-6 * cap - MISS_PENALTY * miss
        allowed = dev <= 1e-9 if ecfg.budget_mode == "ceiling" else torch.ones_like(dev, dtype=torch.bool)
        keep = _top(keep, _Candidates(idx[allowed], rel[allowed], miss[allowed], value[allowed]))
    if not len(keep.rel):
        raise ConfigError(f"{ecfg.budget_type} budget {budget:g}: no architecture in the choice grid costs ≤ the target "
                          f"(ceiling mode); add smaller choices (elastic.fractions / elastic.choices)")
    return keep


def _top(a: _Candidates, b: _Candidates) -> _Candidates:
    merged = [torch.cat([x, y]) for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b))]
    order = merged[3].argsort(descending=True, stable=True)[:MAX_CANDIDATES]
    return _Candidates(*(t[order] for t in merged))


def choose_architectures(cost_model, budgets: tuple[float, ...],
                         log_probs: dict[float, dict[str, torch.Tensor]]) -> dict[float, Outcome]:
    """Final picks per trained budget: the best-scored in-window architecture (a chain if nested).

    `log_probs[b][axis]`: the router's (n_choices,) log-probabilities for budget b. Budget 1.0 is
    the full model by definition.
    """
    space = cost_model.space
    full = Outcome({a: 0 for a in space.axes}, 1.0, 1.0, held=True)
    cands = {b: _candidates(cost_model, b, log_probs[b]) for b in budgets if b < 1.0}
    chosen = _chain(cands) if cost_model.ecfg.nested and cands else {b: 0 for b in cands}
    out = {b: full for b in budgets if b >= 1.0}
    for b, c in cands.items():
        i = chosen[b]
        out[b] = Outcome({a: int(c.idx[i, j]) for j, a in enumerate(space.axes)}, b, float(c.rel[i]),
                         held=float(c.miss[i]) == 0)
    return out


def _chain(cands: dict[float, _Candidates]) -> dict[float, int]:
    """Candidate index per budget maximising the summed score, each contained in the previous.

    Budgets descend; the full model contains everything. best[j] is the best chain value ending
    at candidate j of the current budget (−inf if no chain reaches it).
    """
    order = sorted(cands, reverse=True)
    best, back, prev = None, {}, None
    for b in order:
        c = cands[b]
        if prev is None:
            best = c.value.clone()
        else:
            contained = (cands[prev].idx[:, None, :] <= c.idx[None, :, :]).all(-1)  # (K_prev, K): larger ⊇ smaller
            reach = torch.where(contained, best[:, None], -math.inf)
            best_prev, back[b] = reach.max(0)
            best = c.value + best_prev
            if not torch.isfinite(best).any():  # only when MAX_CANDIDATES cut every chain
                raise ConfigError(
                    f"nested budgets: none of the {len(c.rel)} best architectures for budget {b:g} is contained in one "
                    f"for budget {prev:g}; add choices or train without --nested-budgets")
        prev = b
    chosen = {order[-1]: int(best.argmax())}
    for k in range(len(order) - 1, 0, -1):
        chosen[order[k - 1]] = int(back[order[k]][chosen[order[k]]])
    return chosen
