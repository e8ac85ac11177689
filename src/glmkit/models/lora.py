"""LoRA adapters served unmerged, chosen per batch row (multi-LoRA serving, as S-LoRA and vLLM do).

`glmkit serve --adapter support=DIR --adapter legal=DIR` keeps the base weights as they are and
holds each adapter's A [r, in] and B [out, r] beside them (B already multiplied by alpha/r).  Every
sequence carries an adapter index (GenerationRequest.adapter; 0 = none, k = the k-th adapter
given), and one batched forward serves rows of different adapters and of the base model together:
after each adapted matmul y = x·Wᵀ (wqkv, wo, w13, w2; quantized or not), the rows of adapter k
get y += (x·A_kᵀ)·B_kᵀ.  A batch whose rows all use the base model pays nothing (the Transformer
gets no LoraBatch at all).

Three ways to add the rows' products, measured in bench/adapters_serving.py (`LoraSet.mode`):

- "grouped": per adapter present in the batch, gather its rows and two small matmuls; one
  index_add puts every group's products back.  Work proportional to the rows that use an adapter,
  but a pair of matmuls per adapter per module: many small ops.
- "stacked": A and B of every adapter stacked ([n+1, r_max, in], index 0 zeros), gathered per
  row and multiplied with bmm (Punica's BGMV, in plain PyTorch): shapes fixed by the batch size.
- "concat": every adapter's A concatenated ([R, in], R the adapters' ranks together) and B
  likewise ([out, R]): one matmul for all adapters, the columns of other adapters masked to zero
  per row, one more matmul.  Two dense matmuls whatever the mix of adapters, no gather; it reads
  every adapter's weights each step, which is cheap while R stays small next to the base width.
  The default: the fewest ops per module (four), so the least overhead; fastest in every measured
  case (bench/adapters_serving.py).  For many adapters (R in the thousands), "grouped" reads less.

The engine knows nothing of names: the server's Backend for `<base>:<name>` passes the index.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError

MODES = ("grouped", "stacked", "concat")
DEFAULT_MODE = "concat"      # the fastest measured (bench/adapters_serving.py); fixed shapes, ready for a
                             # compiled path (there is none yet: steps with adapter rows run eagerly)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MODULES = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


@dataclass
class ModuleLora:
    """One adapted matrix of one layer: per adapter index, (A [r, in], scale·B [out, r])."""
    pairs: dict[int, tuple[Tensor, Tensor]]
    n: int                                  # adapters in the set (indices 1..n)
    derived: dict = field(default_factory=dict)   # the stacked / concatenated forms, made on first use

    def stacked(self) -> tuple[Tensor, Tensor]:
        if "stacked" not in self.derived:
            a0, b0 = next(iter(self.pairs.values()))
            r = max(a.shape[0] for a, _ in self.pairs.values())
            a_st = a0.new_zeros(self.n + 1, r, a0.shape[1])
            b_st = b0.new_zeros(self.n + 1, b0.shape[0], r)
            for k, (a, b) in self.pairs.items():
                a_st[k, :a.shape[0]], b_st[k, :, :b.shape[1]] = a, b      # zero rows/columns add nothing
            self.derived["stacked"] = (a_st, b_st)
        return self.derived["stacked"]

    def concat(self) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """(A_cat [R, in], B_cat [out, R], the adapter index of each of the R columns)."""
        if "concat" not in self.derived:
            ks = sorted(self.pairs)
            owner = tuple(k for k in ks for _ in range(self.pairs[k][0].shape[0]))
            self.derived["concat"] = (torch.cat([self.pairs[k][0] for k in ks]).contiguous(),
                                      torch.cat([self.pairs[k][1] for k in ks], dim=1).contiguous(), owner)
        return self.derived["concat"]


class LoraSet:
    """The adapters a Transformer serves unmerged (`Transformer.lora`), by index 1..n."""

    def __init__(self, names: list[str], layers: list[dict[str, ModuleLora]], mode: str = DEFAULT_MODE):
        self.names = names
        self.layers = layers               # per layer: {"attention.wqkv": ModuleLora, ...}
        self.mode = mode

    @classmethod
    def build(cls, model, adapters: Sequence[tuple[str, object]], mode: str = DEFAULT_MODE) -> LoraSet:
        """From models.adapters.Adapter objects, each (name, adapter), checked against `model`'s
        matrices; A and B go to the model's device and activation dtype, scale folded into B."""
        if mode not in MODES:
            raise ValueError(f"LoRA mode {mode!r}: one of {', '.join(MODES)}")
        names = [n for n, _ in adapters]
        if len(set(names)) != len(names):
            raise CheckpointError(f"adapter names must differ: {', '.join(names)}")
        layers: list[dict[str, ModuleLora]] = [{} for _ in model.layers]
        for k, (name, adapter) in enumerate(adapters, start=1):
            for module, (a, b, scale) in adapter.weights.items():
                _, i, sub = module.split(".", 2)
                i = int(i)
                if i >= len(model.layers):
                    raise CheckpointError(f"adapter {name} ({adapter.path}) adapts layer {i}, but the model has "
                                          f"{len(model.layers)} layers: it was trained on a different base model")
                lin = model.layers[i].get_submodule(sub)
                if (b.shape[0], a.shape[1]) != (lin.out_features, lin.in_features):
                    raise CheckpointError(f"adapter {name} ({adapter.path}): {module} is {b.shape[0]}x{a.shape[1]} "
                                          f"but the model's is {lin.out_features}x{lin.in_features}: it was trained "
                                          f"on a different base model")
                pair = (a.to(model.device, model.dtype).contiguous(),
                        (b.float() * scale).to(model.device, model.dtype).contiguous())
                layers[i].setdefault(sub, ModuleLora({}, len(adapters))).pairs[k] = pair
        return cls(names, layers, mode)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise KeyError(name) from None

    def batch(self, ids: Sequence[int], device) -> LoraBatch | None:
        """What one forward call needs for rows using adapters `ids` (0 = none); None when no row
        uses one."""
        ids = [int(i) for i in ids]
        if not any(ids):
            return None
        bad = [i for i in ids if not 0 <= i <= len(self.names)]
        if bad:
            raise ValueError(f"adapter index {bad[0]}; this model serves {len(self.names)} adapters")
        return LoraBatch(self, ids, device)


class LoraBatch:
    """The rows' adapters for one forward call; `at(layer)` is what that layer's modules call as
    lora(module name, x, y) -> y with the rows' LoRA products added."""

    def __init__(self, lora: LoraSet, ids: list[int], device):
        self.lora, self.mode = lora, lora.mode
        self.idx = torch.tensor(ids, device=device)
        if self.mode == "grouped":
            present = sorted(set(ids) - {0})
            # every row on one adapter: no gather, no scatter
            self.groups = [(k, None if all(i == k for i in ids) else
                            torch.tensor([r for r, i in enumerate(ids) if i == k], device=device)) for k in present]
        self._masks: dict[tuple[int, ...], Tensor] = {}

    def at(self, layer: int):
        mods = self.lora.layers[layer]
        return lambda name, x, y: self.add(mods.get(name), x, y)

    def add(self, m: ModuleLora | None, x: Tensor, y: Tensor) -> Tensor:
        """y + the LoRA product of each row of x ([B, T, in]) for its adapter."""
        if m is None:
            return y
        if self.mode == "grouped":
            groups = [(rows, m.pairs[k]) for k, rows in self.groups if k in m.pairs]
            if len(groups) == 1 and groups[0][0] is None:
                a, b = groups[0][1]
                return y + F.linear(F.linear(x, a), b)
            if not groups:
                return y
            # one scatter for every group's rows (each row is in one group)
            rows = torch.cat([r for r, _ in groups])
            return y.index_add(0, rows, torch.cat([F.linear(F.linear(x.index_select(0, r), a), b)
                                                   for r, (a, b) in groups]))
        if self.mode == "stacked":
            a, b = m.stacked()
            return y + torch.bmm(torch.bmm(x, a[self.idx].transpose(1, 2)), b[self.idx].transpose(1, 2))
        a, b, owner = m.concat()
        mask = self._masks.get(owner)
        if mask is None:
            own = torch.tensor(owner, device=self.idx.device)
            mask = self._masks[owner] = (own[None, :] == self.idx[:, None])[:, None, :]   # [B, 1, R]
        # where, not a product with the mask: another adapter's column that overflows (float16)
        # times 0 would be NaN in this row
        return y + F.linear(torch.where(mask, F.linear(x, a), 0), b)
