"""GPTQ: second-order rounding with calibration activations (Frantar et al., 2023).

For a linear layer with inputs X, H = 2/n · X Xᵀ. Columns are quantized one at a time; the
rounding error of column j, divided by the j-th diagonal of the upper Cholesky factor U of
the damped H⁻¹, is pushed onto the columns not yet quantized:  W[:, j:] -= e · U[j, j:].
Updates are applied lazily in blocks of columns (the paper's §3, "lazy batch updates").
With act-order, columns go in order of decreasing diag(H) and group parameters are fitted
up front on the original weight ("static groups"), so the stored groups stay contiguous;
otherwise a group's parameters are fitted when the sweep reaches its first column, on the
weights as updated so far. Any format with a codec (int, nf, fp8, fp4) can be the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LorqError
from ..options import opt
from .affine import as_groups, group_mask
from .base import FORMATS, FormatConfig


@dataclass
class GPTQConfig:
    gptq_damp: float = opt(0.01, "gptq: dampening added to diag(H), as a fraction of its mean")
    gptq_block: int = opt(128, "gptq: columns per lazy-update block")
    act_order: bool = opt(False, "gptq: quantize columns in order of decreasing activation energy (static groups)")


class HessianAccumulator:
    """Running H = 2/n · Σ x xᵀ over every token seen by one linear layer.

    Each batch's Gram matrix is an fp32 GEMM (summed in fp64 across batches); layers fed the
    same input tensor (q/k/v, gate/up) share one product through `gram`.
    """

    def __init__(self):
        self.h = None  # allocated on the first input's device
        self.n = 0

    def add(self, x: torch.Tensor, gram: "GramCache | None" = None) -> None:
        g = (gram or GramCache())(x).double()
        self.h = g.clone() if self.h is None else self.h + g
        self.n += x.numel() // x.shape[-1]

    def hessian(self) -> torch.Tensor:
        return (2.0 / max(self.n, 1)) * self.h if self.h is not None else None


class GramCache:
    """xᵀx of the most recent input, reused while the same, unmodified tensor object comes again
    (holding it keeps its memory from being reused by another tensor)."""

    x = None
    version = None
    value = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.x or x._version != self.version:
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            self.x, self.version, self.value = x, x._version, xf.t() @ xf
        return self.value


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H)."""
    h = h.clone()
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except RuntimeError:
        raise LorqError("gptq: the Hessian is not positive definite; raise --gptq-damp or use more calibration samples")


def quantize_gptq(w: torch.Tensor, h: torch.Tensor, cfg: FormatConfig, gcfg: GPTQConfig):
    """Quantize w (out, in) to cfg's format with GPTQ, given the layer's Hessian h (in, in)."""
    cls = FORMATS.get(cfg.format)
    out_f, in_f = w.shape
    group = cfg.group_for(in_f)
    if in_f % group and not getattr(cls, "partial_groups", False):
        raise LorqError(f"gptq with {cfg.format.value}: group size {group} must divide the input dimension {in_f}")
    W = w.detach().double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = gcfg.act_order or group == in_f
    h = h.to(W.device)
    perm = torch.argsort(torch.diag(h), descending=True) if gcfg.act_order else torch.arange(in_f, device=W.device)
    params = cls.fit_best(as_groups(W, group), cfg, group_mask(in_f, group, W.device)) if static else None
    fitted = [static] * -(-in_f // group)
    W, h = W[:, perm], h[perm][:, perm]
    U = inverse_hessian_factor(h, gcfg.gptq_damp)
    order = perm.tolist()
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    block = max(gcfg.gptq_block // group, 1) * group if not static else gcfg.gptq_block
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, dtype=W.dtype, device=W.device), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = order[i1 + i]  # original column
            g = j // group
            if not fitted[g]:  # in sweep order group g starts here, inside this block
                fresh = cls.fit_best(W1[:, i:i + group].float().unsqueeze(1), cfg)
                params = fresh if params is None else {k: torch.cat([params[k], fresh[k]], dim=1) for k in fresh}
                fitted[g] = True
            col = {k: v[:, g:g + 1] for k, v in params.items()}
            c = cls.encode(W1[:, i].float().view(out_f, 1, 1), col, cfg)
            codes[:, j] = c.view(-1)
            err = (W1[:, i] - cls.decode(c, col, cfg).view(-1).double()) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return cls.from_codes(w.shape, cfg, codes, params)
