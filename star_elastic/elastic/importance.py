"""Importance estimation (paper, pipeline point 1): hooks collect statistics, pure functions score.

Collection runs the model on calibration batches with forward hooks that add fp32 sums into one
flat dict (`ImportanceStats.sums`), padding excluded:
  hidden       mean |x| of every block norm output and of the final norm output, per channel
  attn_heads   mean L2 norm of each head's output (the o_proj input), per attention layer
  mamba_heads  mean L2 norm of each SSM head's channels at the out_proj input, per Mamba layer
  mlp_inter / shared_inter   mean |x| at the down_proj input
  experts      REAP: S_j = mean over tokens routed to j of g_j(x)·‖f_j(x)‖₂ (g: the routing weight the
               model uses — sigmoid score normalised over the top-k and scaled; the correction bias
               only picks the experts), and each expert's intermediate channels' mean |x|
  depth        mean (1 − cos(block input, block output)) per layer
Scores rank each layer's heads, experts and channels by that layer's own statistics (a per-layer
permutation is function-preserving and the kept prefix is then each layer's best); the residual
channels share one ranking, aggregated over all norms, because the residual stream is shared.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from star_elastic.config import ConfigError
from star_elastic.model.hybrid import HybridLM
from star_elastic.model.mlp import relu2


@dataclasses.dataclass
class ImportanceStats:
    sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float().cpu()
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()


# --- collection ---------------------------------------------------------------------------------
def _token_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) → (n_valid, ...) rows of real tokens."""
    return x.reshape(-1, *x.shape[2:])[valid.reshape(-1)]


def collect_stats(model: HybridLM, batches: Iterable[torch.Tensor], pad_id: int | None = None) -> ImportanceStats:
    """Run `batches` of token ids (B, T) through `model` and accumulate the statistics."""
    stats = ImportanceStats()
    state = {"valid": None, "gate": None}
    cfg = model.config
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    handles = []

    def rows(x):
        return _token_rows(x.float(), state["valid"])

    def on_norm(key):
        return lambda mod, args, out: stats.add(key, rows(out).abs().sum(0))

    def on_heads(key, width):
        return lambda mod, args: stats.add(key, rows(args[0]).unflatten(-1, (-1, width)).norm(dim=-1).sum(0))

    def on_channels(key):
        return lambda mod, args: stats.add(key, rows(args[0]).abs().sum(0))

    def on_block(i):
        def hook(mod, args, out):
            x, h = rows(args[0]), rows(out)
            stats.add(f"layers.{i}.depth", (1 - torch.cosine_similarity(x, x + h, dim=-1)).sum().reshape(1))
        return hook

    def on_gate(mod, args, out):
        state["gate"] = out  # (weights (n, k), idx (n, k)) over the flattened tokens

    def on_experts(i):
        def hook(mod, args):
            x = args[0].float()
            weights, idx = state["gate"]
            valid = state["valid"].reshape(-1)
            E, I = mod.num_experts, mod.up_proj.shape[1]
            reap, count, inter = torch.zeros(E), torch.zeros(E), torch.zeros(E, I)
            for e in idx[valid].unique().tolist():
                tok, slot = torch.nonzero((idx == e) & valid[:, None], as_tuple=True)
                h = relu2(x[tok] @ mod.up_proj[e].float().t())  # (n_e, I)
                f = h @ mod.down_proj[e].float().t()  # (n_e, C)
                reap[e] = (weights[tok, slot].float() * f.norm(dim=-1)).sum()
                count[e] = len(tok)
                inter[e] = h.abs().sum(0)
            stats.add(f"layers.{i}.reap", reap)
            stats.add(f"layers.{i}.reap_count", count)
            stats.add(f"layers.{i}.expert_inter", inter)
        return hook

    try:
        for i, block in enumerate(model.backbone.layers):
            handles.append(block.norm.register_forward_hook(on_norm(f"hidden.layers.{i}")))
            handles.append(block.register_forward_hook(on_block(i)))
            mixer = block.mixer
            if block.kind == "*":
                handles.append(mixer.o_proj.register_forward_pre_hook(on_heads(f"layers.{i}.attn_heads", cfg.head_dim)))
            elif block.kind == "M":
                handles.append(mixer.out_proj.register_forward_pre_hook(
                    on_heads(f"layers.{i}.mamba_heads", cfg.mamba_head_dim)))
            elif block.kind == "-":
                handles.append(mixer.down_proj.register_forward_pre_hook(on_channels(f"layers.{i}.mlp_inter")))
            else:
                handles.append(mixer.shared_experts.down_proj.register_forward_pre_hook(
                    on_channels(f"layers.{i}.shared_inter")))
                handles.append(mixer.gate.register_forward_hook(on_gate))
                handles.append(mixer.experts.register_forward_pre_hook(on_experts(i)))
        handles.append(model.backbone.norm_f.register_forward_hook(on_norm("hidden.final")))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for ids in tqdm(list(batches), desc="importance", file=sys.stderr, leave=False):
                state["valid"] = ids != pad_id
                model(ids)
                stats.add("tokens", state["valid"].sum().reshape(1).float())
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return stats


# --- scores: pure functions of the statistics ---------------------------------------------------
def hidden_scores(stats: ImportanceStats) -> torch.Tensor:
    """(C,): mean |activation| per channel, summed over every norm output."""
    tokens = stats.sums["tokens"].clamp_min(1)
    return sum(v for k, v in stats.sums.items() if k.startswith("hidden.")) / tokens


def reap_scores(reap_sum: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(E,): REAP, the mean of g·‖f‖ over the tokens routed to each expert (0 if never routed)."""
    return torch.where(counts > 0, reap_sum / counts.clamp_min(1), torch.zeros_like(reap_sum))


def layer_score(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """1 − cos(block input, block output), averaged over tokens. inputs/outputs (n, C)."""
    return (1 - torch.cosine_similarity(inputs.float(), outputs.float(), dim=-1)).mean()


def compute_scores(stats: ImportanceStats) -> dict[str, torch.Tensor]:
    """Statistics → scores: "hidden" (C,), "depth" (L,), and per layer heads/experts/channels."""
    tokens = stats.sums["tokens"].clamp_min(1)
    scores = {"hidden": hidden_scores(stats)}
    depth = {}
    for key, value in stats.sums.items():
        if not key.startswith("layers."):
            continue
        _, i, name = key.split(".", 2)
        if name == "depth":
            depth[int(i)] = float(value / tokens)
        elif name in ("attn_heads", "mamba_heads", "mlp_inter", "shared_inter"):
            scores[key] = value / tokens
        elif name == "reap":
            counts = stats.sums[f"layers.{i}.reap_count"]
            scores[key.replace(".reap", ".experts")] = reap_scores(value, counts)
            inter = stats.sums[f"layers.{i}.expert_inter"]
            scores[f"layers.{i}.expert_inter"] = inter / counts.clamp_min(1)[:, None]
    scores["depth"] = torch.tensor([depth[i] for i in sorted(depth)])
    return scores


def rank_within_groups(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Permutation sorting each of `groups` contiguous groups by descending score (stable);
    groups stay in place, so a per-group prefix keeps the same count in every group."""
    per = scores.numel() // groups
    order = torch.argsort(scores.view(groups, per), dim=1, descending=True, stable=True)
    return (order + torch.arange(groups)[:, None] * per).reshape(-1)


def save_scores(scores: dict[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.contiguous() for k, v in scores.items()}, str(path))


def load_scores(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (FileNotFoundError, SafetensorError) as err:
        raise ConfigError(f"{path}: cannot read importance scores ({err})") from None
