"""Importance estimation on calibration data (paper, "The pipeline", point 1).

Two halves, kept apart so the formulas can be checked on hand-made tensors:
  1. collection: `collect_stats` runs the model under forward hooks that add fp32 *sums over real
     tokens* into `ImportanceStats` (padding excluded). The per-token terms are computed by small
     pure helpers (`channel_abs_sum`, `head_norm_sum`, `reap_sums`, `depth_sum`).
  2. scoring: pure functions of the statistics turn sums into means and aggregate them.

What is measured, per axis:
  hidden        mean |x| per channel at every block norm output and at the final norm output
  attn_heads    mean L2 norm of each head's output (the o_proj input), per attention layer
  mamba_heads   mean L2 norm of each SSM head's channels at the out_proj input, per Mamba layer
  mlp_inter     mean |x| per channel at the down_proj input of dense MLP layers
  shared_inter  the same at the shared expert's down_proj input
  experts       REAP: S_j = mean over tokens routed to j of g_j(x)·‖f_j(x)‖₂, with g the routing
                weight the model really multiplies by (sigmoid score of the chosen experts,
                normalised over the top-k and scaled; the correction bias only selects)
  expert_inter  per expert, mean |relu²(up x)| over the tokens routed to it: (E, I)
  depth         mean over tokens of 1 − cos(block input x, block output x + mixer(norm(x)))

Per-layer versus shared orders. A permutation of one layer's heads, experts or intermediate
channels is function-preserving on its own, so each layer is sorted by *its own* scores and the
kept prefix is that layer's best (`compute_scores` returns one score vector per layer). The
residual (hidden) channels are different: every layer reads and writes the same residual stream,
so they get ONE order, from scores aggregated over all norms. The `*_scores(stats, layer=None)`
functions also give the aggregated-over-layers score of every axis (sum over layers of the
per-layer means) for callers that want one order per axis.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from star_elastic.config import BLOCK_CHARS, ConfigError
from star_elastic.model.hybrid import HybridLM
from star_elastic.model.mlp import relu2


@dataclasses.dataclass
class ImportanceStats:
    """fp32 sums over real calibration tokens, keyed by what they measure.

    Keys (i = layer index, shapes in brackets):
      "norm.{i}" (C,), "norm_f" (C,)              sum of |x| at block norm i / the final norm
      "layers.{i}.attn_heads" (nh,)                sum of each head's L2 norm
      "layers.{i}.mamba_heads" (H,)                sum of each SSM head's L2 norm
      "layers.{i}.mlp_inter" (I,), ".shared_inter" (Is,)   sum of |x| at down_proj inputs
      "layers.{i}.reap" (E,)                       sum over routed (token, expert) of g·‖f‖
      "layers.{i}.routed" (E,)                     number of tokens routed to each expert
      "layers.{i}.expert_inter" (E, Ie)            sum over routed tokens of |relu²(up x)|
      "layers.{i}.depth" ()                        sum of 1 − cos(x, x + h)
    """

    pattern: str
    """The model's layer pattern: which layers carry which keys."""
    tokens: float = 0.0
    """Real (non-padding) tokens seen."""
    sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def add(self, key: str, value: torch.Tensor) -> None:
        """Accumulate `value` (any device) into the fp32 sum `key`."""
        value = value.detach().float()
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()

    def mean(self, key: str) -> torch.Tensor:
        """sum / tokens: the per-token mean of a statistic."""
        return self.sums[key] / max(self.tokens, 1.0)


# --- per-token terms: pure helpers used by the hooks -------------------------------------------
def channel_abs_sum(x: torch.Tensor) -> torch.Tensor:
    """x (n, C) → (C,): sum over tokens of |x| per channel."""
    return x.float().abs().sum(0)


def head_norm_sum(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """x (n, heads*width), heads contiguous → (heads,): sum over tokens of each head's L2 norm."""
    return x.float().unflatten(-1, (num_heads, -1)).norm(dim=-1).sum(0)


def depth_sum(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Block input x (n, C) and mixer output h (n, C) → (): sum over tokens of 1 − cos(x, x + h).

    The block returns only h; the residual add happens in HybridLM.forward, so the block's real
    output x + h is formed here.
    """
    x = x.float()
    return (1 - torch.cosine_similarity(x, x + h.float(), dim=-1)).sum()


def reap_sums(
    x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """REAP and per-expert channel terms of one MoE layer, recomputed in fp32.

    x (n, C) router/expert input, weights/idx (n, k) the router's output (gate values, experts),
    up (E, I, C), down (E, C, I). Returns, per expert j:
      reap  (E,)    sum over (token, slot) routed to j of g_j(x)·‖f_j(x)‖₂, f_j = down_j relu²(up_j x)
      count (E,)    number of tokens routed to j
      inter (E, I)  sum over those tokens of |relu²(up_j x)| (the expert's down_proj input)
    Calibration runs on the unquantized parent, so `Experts.act_quant` is deliberately not applied.
    """
    E, I, _ = up.shape
    n, k = idx.shape
    flat = idx.reshape(-1)  # (n*k,) expert of each (token, slot)
    token = torch.arange(n * k, device=idx.device) // k  # (n*k,) token of each slot
    gate = weights.reshape(-1).float()
    reap = torch.zeros(E, device=x.device)
    inter = torch.zeros(E, I, device=x.device)
    count = torch.bincount(flat, minlength=E).float().to(x.device)
    for e in flat.unique().tolist():
        slots = flat == e
        xe = x[token[slots]].float()  # (n_e, C)
        h = relu2(xe @ up[e].float().t())  # (n_e, I)
        f = h @ down[e].float().t()  # (n_e, C)
        reap[e] = (gate[slots] * f.norm(dim=-1)).sum()
        inter[e] = h.abs().sum(0)
    return reap, count, inter


# --- collection ---------------------------------------------------------------------------------
def _register_hooks(model: HybridLM, stats: ImportanceStats, valid: Callable[[], torch.Tensor], handles: list) -> None:
    """Attach the statistic hooks, appending their handles to `handles` as they are made (so a
    failure halfway still leaves every attached hook removable); `valid()` returns the current
    batch's (B, T) bool mask of real tokens."""
    cfg = model.config

    def rows(t):  # (B, T, ...) → (n_real, ...): real tokens only
        return t[valid()]

    def flat_rows(t):  # (B*T, ...) as the MoE flattens its tokens → (n_real, ...)
        return t[valid().reshape(-1)]

    def on_output(key, fn):  # forward hook: statistic of the module's output
        return lambda mod, args, out: stats.add(key, fn(rows(out)))

    def on_input(key, fn):  # forward pre-hook: statistic of the module's first input
        return lambda mod, args: stats.add(key, fn(rows(args[0])))

    def on_block(i):
        def hook(mod, args, out):  # args[0]: the residual stream x entering block i; out: h
            stats.add(f"layers.{i}.depth", depth_sum(rows(args[0]), rows(out)))
        return hook

    def on_experts(i):
        def hook(mod, args):
            # Experts.forward(x (n, C), weights (n, k), idx (n, k), ...) receives the router's output
            # as the model uses it, so g here is the real gate value.
            x, weights, idx = (flat_rows(a) for a in args[:3])
            reap, count, inter = reap_sums(x, weights, idx, mod.up_proj, mod.down_proj)
            stats.add(f"layers.{i}.reap", reap)
            stats.add(f"layers.{i}.routed", count)
            stats.add(f"layers.{i}.expert_inter", inter)
        return hook

    for i, block in enumerate(model.backbone.layers):
        mixer, p = block.mixer, f"layers.{i}."
        handles.append(block.norm.register_forward_hook(on_output(f"norm.{i}", channel_abs_sum)))
        handles.append(block.register_forward_hook(on_block(i)))
        if block.kind == "*":  # o_proj input (B, T, nh*hd): heads contiguous
            heads = partial(head_norm_sum, num_heads=cfg.num_attention_heads)
            handles.append(mixer.o_proj.register_forward_pre_hook(on_input(p + "attn_heads", heads)))
        elif block.kind == "M":  # out_proj input (B, T, H*P): gated-norm output, heads contiguous
            heads = partial(head_norm_sum, num_heads=cfg.mamba_num_heads)
            handles.append(mixer.out_proj.register_forward_pre_hook(on_input(p + "mamba_heads", heads)))
        elif block.kind == "-":
            handles.append(mixer.down_proj.register_forward_pre_hook(on_input(p + "mlp_inter", channel_abs_sum)))
        else:
            shared = mixer.shared_experts.down_proj
            handles.append(shared.register_forward_pre_hook(on_input(p + "shared_inter", channel_abs_sum)))
            handles.append(mixer.experts.register_forward_pre_hook(on_experts(i)))
    handles.append(model.backbone.norm_f.register_forward_hook(on_output("norm_f", channel_abs_sum)))


def collect_stats(
    model: HybridLM,
    batches: Iterable[torch.Tensor],
    attention_mask: Iterable[torch.Tensor] | None = None,
    seq_idx: Iterable[torch.Tensor] | None = None,
) -> ImportanceStats:
    """Run calibration `batches` of token ids (B, T) through `model`; return the summed statistics.

    attention_mask: one (B, T) 0/1 mask per batch (1 = real token), zipped with `batches`. When
    None, tokens equal to the config's pad_token_id count as padding. Padding never enters a
    statistic, and batches with padding are run with their mask so that left padding is also
    exact. seq_idx: one (B, T) per batch for packed rows (`HybridLM.forward`): every document runs
    as if alone; their padding is a document of its own, so they run without attention mask. The model runs in eval mode under no_grad;
    hooks are always removed, and the train/eval mode restored, even on error.
    """
    cfg = model.config
    stats = ImportanceStats(pattern=cfg.pattern)
    current: dict[str, torch.Tensor] = {}
    handles: list = []
    masks = iter(attention_mask) if attention_mask is not None else None
    documents = iter(seq_idx) if seq_idx is not None else None
    was_training = model.training
    try:
        _register_hooks(model, stats, lambda: current["valid"], handles)
        model.eval()
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.no_grad():
            for ids in tqdm(batches, total=total, desc="importance", file=sys.stderr, leave=False):
                ids = ids.to(model.device)
                if masks is not None:
                    valid = next(masks).to(ids.device).bool()
                elif cfg.pad_token_id is not None:
                    valid = ids != cfg.pad_token_id
                else:
                    valid = torch.ones_like(ids, dtype=torch.bool)
                if valid.shape != ids.shape:
                    raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape {tuple(ids.shape)}")
                current["valid"] = valid
                if documents is not None:
                    model(ids, seq_idx=next(documents).to(ids.device))
                else:
                    model(ids, attention_mask=None if bool(valid.all()) else valid.long())
                stats.tokens += float(valid.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stats.sums = {k: v.cpu() for k, v in stats.sums.items()}
    return stats


# --- scores: pure functions of the statistics ---------------------------------------------------
def _layers(stats: ImportanceStats, kind: str) -> list[int]:
    return [i for i, c in enumerate(stats.pattern) if c == kind]


def _score(stats: ImportanceStats, kind: str, layer: int | None, one: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """`one(layer)` for a single layer of block kind `kind`, or its sum over every such layer."""
    if layer is not None:
        if stats.pattern[layer] != kind:
            raise ValueError(f"layer {layer} is a {BLOCK_CHARS[stats.pattern[layer]]} layer, not {BLOCK_CHARS[kind]}")
        return one(layer)
    layers = _layers(stats, kind)
    if not layers:
        raise ValueError(f"the pattern {stats.pattern!r} has no {BLOCK_CHARS[kind]} layer")
    return torch.stack([one(i) for i in layers]).sum(0)


def hidden_scores(stats: ImportanceStats) -> torch.Tensor:
    """(C,): per channel, mean |x| over tokens at each norm output, summed over all L block norms
    and the final norm (Minitron's aggregation: mean over batch and sequence, sum over layers).
    One score for the whole residual stream, since every layer shares it."""
    keys = [f"norm.{i}" for i in range(len(stats.pattern))] + ["norm_f"]
    return torch.stack([stats.mean(k) for k in keys]).sum(0)


def attention_head_scores(stats: ImportanceStats, layer: int | None = None) -> torch.Tensor:
    """(num_attention_heads,): mean L2 norm of each head's output; summed over attention layers
    when `layer` is None."""
    return _score(stats, "*", layer, lambda i: stats.mean(f"layers.{i}.attn_heads"))


def mamba_head_scores(stats: ImportanceStats, layer: int | None = None) -> torch.Tensor:
    """(mamba_num_heads,): mean L2 norm of each SSM head at out_proj's input; summed over Mamba
    layers when `layer` is None."""
    return _score(stats, "M", layer, lambda i: stats.mean(f"layers.{i}.mamba_heads"))


def mlp_channel_scores(stats: ImportanceStats, layer: int | None = None) -> torch.Tensor:
    """(intermediate_size,): mean |x| at the dense MLP down_proj input."""
    return _score(stats, "-", layer, lambda i: stats.mean(f"layers.{i}.mlp_inter"))


def shared_channel_scores(stats: ImportanceStats, layer: int | None = None) -> torch.Tensor:
    """(moe_shared_expert_intermediate_size,): mean |x| at the shared expert's down_proj input."""
    return _score(stats, "E", layer, lambda i: stats.mean(f"layers.{i}.shared_inter"))


def reap(weighted_norm_sum: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """REAP (E,): mean of g·‖f‖ over the tokens routed to each expert; 0 for a never-routed one."""
    return torch.where(routed > 0, weighted_norm_sum / routed.clamp_min(1), torch.zeros_like(weighted_norm_sum))


def expert_scores(stats: ImportanceStats, layer: int | None = None) -> torch.Tensor:
    """(n_routed_experts,): REAP per expert; summed over MoE layers when `layer` is None."""
    return _score(stats, "E", layer, lambda i: reap(stats.sums[f"layers.{i}.reap"], stats.sums[f"layers.{i}.routed"]))


def expert_channel_scores(stats: ImportanceStats, layer: int | None = None) -> torch.Tensor:
    """(E, moe_intermediate_size): per expert, mean |x| at its down_proj input over the tokens
    routed to it (zeros for a never-routed expert); summed over MoE layers when `layer` is None."""

    def one(i):
        routed = stats.sums[f"layers.{i}.routed"].clamp_min(1)  # (E,)
        return stats.sums[f"layers.{i}.expert_inter"] / routed[:, None]

    return _score(stats, "E", layer, one)


def layer_scores(stats: ImportanceStats) -> torch.Tensor:
    """(L,): mean over tokens of 1 − cos(block input, block output) per layer."""
    return torch.stack([stats.mean(f"layers.{i}.depth") for i in range(len(stats.pattern))])


def rank_within_groups(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Permutation (n,) sorting each of `groups` contiguous, equal groups by descending score.

    Group blocks stay in place, so keeping a prefix of k per group keeps every group's k best and
    the same count in every group (attention: query heads of one KV head; Mamba: heads of one SSM
    group). Ties keep the lower index first.
    """
    n = scores.numel()
    if n % groups:
        raise ValueError(f"{n} scores do not split into {groups} equal groups")
    per = n // groups
    order = torch.argsort(scores.reshape(groups, per), dim=1, descending=True, stable=True)  # (groups, per)
    return (order + torch.arange(groups, device=order.device)[:, None] * per).reshape(-1)


_PER_LAYER = {  # block kind → (score key suffix, scoring function)
    "*": [("attn_heads", attention_head_scores)],
    "M": [("mamba_heads", mamba_head_scores)],
    "-": [("mlp_inter", mlp_channel_scores)],
    "E": [("experts", expert_scores), ("expert_inter", expert_channel_scores), ("shared_inter", shared_channel_scores)],
}


def compute_scores(stats: ImportanceStats) -> dict[str, torch.Tensor]:
    """All scores: "hidden" (C,) shared, "depth" (L,), and per layer i its own
    "layers.{i}.attn_heads" | "mamba_heads" | "mlp_inter" | "experts" | "expert_inter" | "shared_inter"."""
    scores = {"hidden": hidden_scores(stats), "depth": layer_scores(stats)}
    for i, kind in enumerate(stats.pattern):
        for name, fn in _PER_LAYER[kind]:
            scores[f"layers.{i}.{name}"] = fn(stats, i)
    return scores


# --- storage (safetensors, never pickle) ---------------------------------------------------------
CONTENT = "star_elastic importance scores"
KEY_NAMES = {"parent": "parent weights", "calibration": "calibration batches"}
"""What a scores file's key says it was computed from (safetensors metadata)."""


def save_scores(scores: dict[str, torch.Tensor], path: str | Path, key: dict[str, str] | None = None) -> None:
    """Write `scores` to a safetensors file; `key` (see KEY_NAMES: fingerprints of what they were
    computed from) goes into its metadata."""
    save_file({k: v.detach().cpu().contiguous() for k, v in scores.items()}, str(path),
              metadata={"content": CONTENT, **(key or {})})


def scores_match(path: str | Path, key: dict[str, str], log) -> bool:
    """Whether the scores file at `path` was computed from `key` (so it can be reused); a file that
    was not, or that has no key (an older star-elastic's) or cannot be read, gets a note in `log`."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            saved = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        log(f"note: {path} is unreadable ({err}); recomputing the importance scores")
        return False
    differ = [KEY_NAMES.get(k, k) for k in key if saved.get(k) != key[k]]
    if differ:
        log(f"note: {path} was not computed from these {' and '.join(differ)} (fingerprints differ); recomputing "
            "the importance scores")
    return not differ


def load_scores(path: str | Path) -> dict[str, torch.Tensor]:
    """Read scores written by `save_scores`; a missing or unreadable file raises ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: cannot read importance scores (no such file)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{path}: cannot read importance scores ({err})") from None
