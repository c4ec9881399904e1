"""Budget-conditioned router and the differentiable cost of the architecture it picks.

Router (paper, pipeline point 4): the target budget enters as a one-hot vector over the trained
budgets (a budget between two trained ones is a two-hot interpolation); per elastic axis a small
MLP maps it to logits over that axis's choices; hard Gumbel-Softmax (straight-through) turns the
logits into a one-hot pick whose gradient is the soft sample's. Masks are then the pick times the
axis's mask table, so the forward pass is exactly one architecture.

Cost (point 5): with a pick per axis, each axis's size is `pick · choices` (exact for one-hot,
differentiable in the pick) and the cost is the accounting formula of `star_elastic.accounting`
evaluated on those sizes: the same arithmetic that counts parameters of real configs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from star_elastic import accounting
from star_elastic.config import ConfigError, ElasticConfig
from star_elastic.elastic.arch import slice_model
from star_elastic.elastic.projection import Outcome, choose_architectures, dead_zone
from star_elastic.elastic.space import ChoiceSpace


def encode_budget(budget: float, budgets: tuple[float, ...]) -> torch.Tensor:
    """Budget → (n_budgets,) one-hot, or two-hot between the neighbouring trained budgets."""
    hi, lo = budgets[0], budgets[-1]
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        raise ConfigError(f"budget {budget} is outside the trained range [{lo}, {hi}]")
    vec = torch.zeros(len(budgets))
    for i, b in enumerate(budgets):
        if abs(budget - b) < 1e-9:
            vec[i] = 1.0
            return vec
    i = max(j for j, b in enumerate(budgets) if b > budget)  # budgets[i] > budget > budgets[i+1]
    w = (budget - budgets[i + 1]) / (budgets[i] - budgets[i + 1])
    vec[i], vec[i + 1] = w, 1 - w
    return vec


def gumbel_pick(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """Hard Gumbel-Softmax with a straight-through gradient; seeded by `generator`."""
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1 - 1e-10).to(logits.device)
    soft = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


class BudgetRouter(nn.Module):
    def __init__(self, space: ChoiceSpace, n_budgets: int, hidden: int = 64):
        super().__init__()
        self.axes = space.axes
        self.nets = nn.ModuleDict({
            axis: nn.Sequential(nn.Linear(n_budgets, hidden), nn.GELU(), nn.Linear(hidden, len(space.choices[axis])))
            for axis in self.axes
        })

    def forward(self, budget_vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """(n_budgets,) → logits per axis."""
        return {axis: net(budget_vec) for axis, net in self.nets.items()}

    def sample(self, budget_vec: torch.Tensor, tau: float, generator=None) -> dict[str, torch.Tensor]:
        return {axis: gumbel_pick(logits, tau, generator) for axis, logits in self(budget_vec).items()}

    def pick(self, budget_vec: torch.Tensor) -> dict[str, int]:
        """Deterministic choice index per axis (inference and slicing)."""
        with torch.no_grad():
            return {axis: int(logits.argmax()) for axis, logits in self(budget_vec).items()}


def one_hot_picks(space: ChoiceSpace, picks: dict[str, int]) -> dict[str, torch.Tensor]:
    return {axis: F.one_hot(torch.tensor(i), len(space.choices[axis])).float() for axis, i in picks.items()}


class CostModel:
    """Cost of an architecture (as per-axis picks) in the chosen budget type, differentiable."""

    def __init__(self, space: ChoiceSpace, ecfg: ElasticConfig, latency_table: dict | None = None):
        self.space, self.cfg, self.ecfg = space, space.cfg, ecfg
        self.budget_type = ecfg.budget_type
        if self.budget_type == "latency" and latency_table is None:
            raise ConfigError("budget_type 'latency' needs a latency table: run the profile step first")
        self.latency_table = latency_table
        self.values = {a: torch.tensor(c, dtype=torch.float64) for a, c in space.choices.items()}
        self.depth_table = space.mask_table("depth", torch.float64) if "depth" in space.choices else None
        self.full = float(self.cost(one_hot_picks(space, {a: 0 for a in space.axes})))

    def sizes(self, picks: dict[str, torch.Tensor]) -> SimpleNamespace:
        """A config-like namespace whose elastic sizes are `pick · choices` (tensors)."""
        cfg = self.cfg
        s = {a: picks[a].double() @ self.values[a] for a in picks if a != "depth"}
        kv, g = cfg.num_key_value_heads, cfg.n_groups
        ns = SimpleNamespace(**cfg.to_dict())
        ns.hidden_size = s.get("hidden", cfg.hidden_size)
        ns.num_attention_heads = s["attn_heads"] * kv if "attn_heads" in s else cfg.num_attention_heads
        ns.mamba_num_heads = s["mamba_heads"] * g if "mamba_heads" in s else cfg.mamba_num_heads
        ns.n_routed_experts = s.get("experts", cfg.n_routed_experts)
        ns.moe_intermediate_size = s.get("expert_inter", cfg.moe_intermediate_size)
        ns.moe_shared_expert_intermediate_size = s.get("shared_inter", cfg.moe_shared_expert_intermediate_size)
        ns.intermediate_size = s.get("mlp_inter", cfg.intermediate_size)
        ns.mamba_inner = ns.mamba_num_heads * cfg.mamba_head_dim
        ns.mamba_conv_dim = ns.mamba_inner + 2 * g * cfg.ssm_state_size
        return ns

    def layer_keep(self, picks: dict[str, torch.Tensor]) -> torch.Tensor:
        """(L,) 1 for kept layers (differentiable in the depth pick)."""
        if self.depth_table is None:
            return torch.ones(self.cfg.num_layers, dtype=torch.float64)
        return picks["depth"].double() @ self.depth_table

    def params(self, picks: dict[str, torch.Tensor], active: bool) -> torch.Tensor:
        ns, keep = self.sizes(picks), self.layer_keep(picks)
        heads = 1 if self.cfg.tie_word_embeddings else 2
        total = heads * ns.vocab_size * ns.hidden_size + ns.hidden_size  # embeddings (+ head) + final norm
        for i, block in enumerate(self.cfg.pattern):
            total = total + keep[..., i] * accounting.layer_params(ns, block, active)
        return total

    def memory(self, picks: dict[str, torch.Tensor]) -> torch.Tensor:
        ns, keep = self.sizes(picks), self.layer_keep(picks)
        b, ctx = self.ecfg.memory_batch, self.ecfg.memory_context
        total = self.params(picks, active=False) * 2  # bf16 weights
        for i, block in enumerate(self.cfg.pattern):
            if block == "*":
                total = total + keep[..., i] * accounting.kv_cache_layer_bytes(ns, b, ctx)
            elif block == "M":
                total = total + keep[..., i] * accounting.ssm_state_layer_bytes(ns, b)
        return total

    def latency(self, picks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Additive table: full latency + Σ_axis (latency with only that axis reduced − full)."""
        table = self.latency_table
        total = torch.tensor(table["full"], dtype=torch.float64)
        for axis, pick in picks.items():
            total = total + pick.double() @ (torch.tensor(table["axes"][axis], dtype=torch.float64) - table["full"])
        return total

    def cost(self, picks: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.budget_type == "total_params":
            return self.params(picks, active=False)
        if self.budget_type == "active_params":
            return self.params(picks, active=True)
        if self.budget_type == "memory":
            return self.memory(picks)
        return self.latency(picks)

    def relative(self, picks: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cost(picks) / self.full

    def capacity(self, picks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Total parameters relative to the full model, whatever the budget type."""
        if not hasattr(self, "_full_total"):
            self._full_total = float(self.params(one_hot_picks(self.space, {a: 0 for a in self.space.axes}), False))
        return self.params(picks, active=False) / self._full_total


# Weight of the capacity term: between architectures of (nearly) equal cost the router prefers the
# larger one. Without it an axis that barely moves the cost (experts under an active-parameter
# budget) drifts freely; with it the budget's optimum moves by about CAPACITY_WEIGHT·budget/2.
CAPACITY_WEIGHT = 1e-2


def router_loss(cost_model: CostModel, picks: dict[str, torch.Tensor], budget: float) -> torch.Tensor:
    """The router's objective: `budget_penalty` minus `capacity_reward` (see both)."""
    penalty, reward = router_loss_parts(cost_model, picks, budget)
    return penalty - reward


def router_loss_parts(cost_model: CostModel, picks: dict[str, torch.Tensor],
                      budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(budget_penalty ≥ 0, capacity_reward ≥ 0); the router minimises penalty − reward.

    budget_penalty: a dead-zone loss on the picked architecture's relative deviation from the
    target budget. Zero inside the inner half of the budget's window (`projection.dead_zone`:
    ±tol/2 in band mode, [−1.5·tol, −0.5·tol] in ceiling mode), linear plus quadratic outside:
    unlike a plain square, whose pull vanishes near the target and lets distillation drag the picks
    up (+9% on the demo), the pull stays ≥ 1 per unit of deviation (budget_mode none keeps that plain
    square). capacity_reward: CAPACITY_WEIGHT × the architecture's total parameters relative to the
    full model's (at most 0.01), so that ties between equal-cost architectures go to the larger one."""
    ecfg = cost_model.ecfg
    dev = cost_model.relative(picks) / budget - 1.0
    reward = CAPACITY_WEIGHT * cost_model.capacity(picks)
    if ecfg.budget_mode == "none":
        return dev ** 2, reward
    lo, hi = dead_zone(ecfg.budget_mode, ecfg.budget_tolerance)
    excess = F.relu(lo - dev) + F.relu(dev - hi)
    return excess + excess ** 2, reward


def fit_router_to_cost(
    router: BudgetRouter, cost_model: CostModel, budgets: tuple[float, ...], steps: int = 400, lr: float = 0.05,
    tau: tuple[float, float] = (2.0, 0.2), seed: int = 0,
) -> list[float]:
    """Fit the router to the cost alone (no model forward), annealing the Gumbel temperature, then
    settle its picks onto the budgets' windows."""
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    fitted = [b for b in budgets if b < 1.0]  # budget 1.0 is the full model by definition
    for step in range(steps if fitted else 0):
        t = tau[0] * (tau[1] / tau[0]) ** (step / max(1, steps - 1))
        loss = sum(
            router_loss(cost_model, router.sample(encode_budget(b, budgets), t, g), b) for b in fitted
        ) / len(fitted)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    settle_router(router, cost_model, budgets)
    return history


def settle_router(router: BudgetRouter, cost_model: CostModel, budgets: tuple[float, ...]) -> dict[float, Outcome]:
    """Project the router's preferences onto the budgets' windows (`projection`) and teach it the
    result: afterwards its argmax for every trained budget is the projected architecture."""
    device = next(router.parameters()).device
    with torch.no_grad():
        log_probs = {b: {a: F.log_softmax(logits, -1).cpu() for a, logits in router(encode_budget(b, budgets).to(device)).items()}
                     for b in budgets}
    outcomes = choose_architectures(cost_model, budgets, log_probs)
    teach_router(router, budgets, {b: o.picks for b, o in outcomes.items()})
    return outcomes


def teach_router(router: BudgetRouter, budgets: tuple[float, ...], targets: dict[float, dict[str, int]],
                 steps: int = 200, max_steps: int = 2000, lr: float = 0.05) -> None:
    """Cross-entropy steps so that the router's argmax is `targets[b]` for every trained budget: at
    least `steps` (the picks then dominate the Gumbel samples that follow), more until it holds."""
    device = next(router.parameters()).device
    vecs = {b: encode_budget(b, budgets).to(device) for b in budgets}
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    for step in range(max_steps):
        if step >= steps and step % 10 == 0 and all(router.pick(vecs[b]) == targets[b] for b in budgets):
            return
        loss = sum(
            F.cross_entropy(logits[None], torch.tensor([targets[b][axis]], device=device))
            for b in budgets for axis, logits in router(vecs[b]).items()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    if not all(router.pick(vecs[b]) == targets[b] for b in budgets):
        raise RuntimeError(f"router did not learn the settled picks in {max_steps} steps")


def profile_latency(model, space: ChoiceSpace, batch: int = 1, seq_len: int = 128, repeats: int = 5) -> dict:
    """Measure forward latency of the full model and of each single-axis reduction (sliced).

    Returns {"full": s, "axes": {axis: [s per choice]}, "device": ..., "shape": [batch, seq_len]}.
    """
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=model.device)

    def measure(m) -> float:
        with torch.inference_mode():
            m(ids)
            times = []
            for _ in range(repeats):
                if ids.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(ids)
                if ids.is_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    table = {"full": measure(model), "axes": {}, "device": str(model.device), "shape": [batch, seq_len]}
    for axis in space.axes:
        row = [table["full"]]
        for i in range(1, len(space.choices[axis])):
            row.append(measure(slice_model(model, space.architecture({axis: i}))))
        table["axes"][axis] = row
    return table


def save_latency_table(table: dict, path: Path) -> None:
    path.write_text(json.dumps(table, indent=2) + "\n")


def load_latency_table(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read latency table ({err})") from None
