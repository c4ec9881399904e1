"""Serve any nested submodel from the parent's own tensors: no per-budget weight copies.

`view_model(parent, arch)` builds a HybridLM of the sliced config whose parameters are *views* of
the parent's: every index set of `IndexSets.prefix` that is one contiguous run becomes a `narrow`
(zero-copy, strided; BLAS reads sub-matrices in place). Projections whose kept rows or columns
form several runs (heads kept per group, Mamba's [z | x | B | C | dt] rows) become a
`SegmentedLinear`: one matmul per run on views, outputs concatenated in index order, so the
result equals the gathered (sliced) weight's. Only tiny per-channel vectors with several runs
(conv taps, gated-norm weights, A_log/D/dt_bias of kept heads) are copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from star_elastic.elastic.arch import Architecture, IndexSets, gather, renumber_layer
from star_elastic.model.hybrid import HybridLM


def runs(idx: torch.Tensor) -> list[tuple[int, int]]:
    """Ascending indices → maximal contiguous runs as (start, length)."""
    values = idx.tolist()
    if values != sorted(values):
        raise ValueError("index sets of nested slices are ascending")
    out: list[tuple[int, int]] = []
    for v in values:
        if out and out[-1][0] + out[-1][1] == v:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


class SegmentedLinear(nn.Module):
    """y = x @ W[rows, cols].T (+ b[rows]) computed on views of W, never on a gathered copy.

    Small weights (≤ `BOUNDING_MAX` elements, where per-op overhead dominates): one matmul on the
    view spanning every kept row and column, the input scattered into its columns and the kept
    output rows gathered. Large weights: one matmul per contiguous run, no wasted FLOPs.
    """

    BOUNDING_MAX = 1 << 20

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, row_runs, col_runs):
        super().__init__()
        self.weight, self.bias = weight, bias  # the parent's tensors (not copied, not registered)
        self.row_runs, self.col_runs = row_runs, col_runs
        self.in_features = sum(n for _, n in col_runs)
        r0, r1 = row_runs[0][0], row_runs[-1][0] + row_runs[-1][1]
        c0, c1 = col_runs[0][0], col_runs[-1][0] + col_runs[-1][1]
        self.bounding = (r1 - r0) * (c1 - c0) <= self.BOUNDING_MAX
        if self.bounding:
            self.block = weight[r0:r1, c0:c1]  # a view
            self.block_bias = None if bias is None else bias[r0:r1]
            self.rows = None if len(row_runs) == 1 else _offsets(row_runs, r0)
            self.cols = None if len(col_runs) == 1 else _offsets(col_runs, c0)
            self.width = c1 - c0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bounding:
            if self.cols is not None:  # kept input channels at their columns, zeros between
                x = x.new_zeros(*x.shape[:-1], self.width).index_copy_(-1, self.cols.to(x.device), x)
            y = F.linear(x, self.block, self.block_bias)
            return y if self.rows is None else y.index_select(-1, self.rows.to(y.device))
        outs = []
        for r0, rn in self.row_runs:
            y, c = None, 0
            for c0, cn in self.col_runs:
                part = F.linear(x[..., c : c + cn], self.weight[r0 : r0 + rn, c0 : c0 + cn])
                y = part if y is None else y + part
                c += cn
            if self.bias is not None:
                y = y + self.bias[r0 : r0 + rn]
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _offsets(run_list, start: int) -> torch.Tensor:
    return torch.cat([torch.arange(s - start, s - start + n) for s, n in run_list])


def _view(t: torch.Tensor, rule: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """A zero-copy view when every listed dim keeps one contiguous run, else None."""
    for dim, idx in rule.items():
        if idx.dim() != 1:
            return None
        r = runs(idx)
        if len(r) != 1:
            return None
        t = t.narrow(dim, r[0][0], r[0][1])
    return t


def view_model(parent: HybridLM, arch: Architecture) -> HybridLM:
    """The submodel `arch` as a HybridLM sharing the parent's storage (see module docstring)."""
    cfg = parent.config
    sets = IndexSets.prefix(cfg, arch)
    small_cfg = arch.model_config(cfg)
    with torch.device("meta"):
        small = HybridLM(small_cfg)
    new_index = {old: new for new, old in enumerate(arch.layers)}
    params = dict(parent.named_parameters(remove_duplicate=False)) | dict(parent.named_buffers())
    linear_names = {n for n, m in parent.named_modules() if isinstance(m, nn.Linear)}
    for key, t in params.items():
        new_key = renumber_layer(key, new_index)
        if new_key is None:
            continue
        module_name, leaf = new_key.rsplit(".", 1)
        old_module = key.rsplit(".", 1)[0]
        rule = sets.rule(key)
        view = _view(t.detach(), rule)
        if view is None and old_module in linear_names and leaf == "weight":
            bias_key = f"{old_module}.bias"
            bias = params.get(bias_key)
            seg = SegmentedLinear(t.detach(), None if bias is None else bias.detach(),
                                  runs(rule.get(0, torch.arange(t.shape[0]))), runs(rule.get(1, torch.arange(t.shape[1]))))
            _set_module(small, module_name, seg)
            continue
        if view is None and leaf == "bias" and old_module in linear_names and _is_segmented(small, module_name):
            continue  # carried by its SegmentedLinear
        value = view if view is not None else gather(t.detach(), rule)
        _set_tensor(small, new_key, value)
    if small_cfg.tie_word_embeddings:
        small.lm_head.weight = small.backbone.embeddings.weight
    small.tokenizer = parent.tokenizer
    return small.eval()


def _is_segmented(root: nn.Module, name: str) -> bool:
    return isinstance(root.get_submodule(name), SegmentedLinear)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, child = name.rsplit(".", 1)
    setattr(root.get_submodule(parent_name), child, module)


def _set_tensor(root: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, leaf = key.rsplit(".", 1)
    module = root.get_submodule(module_name)
    if isinstance(module, SegmentedLinear):
        return
    if leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
