"""HQQ: calibration-free half-quadratic optimization of the affine zero point.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023). With the
scale fixed by the group's range, the zero point z minimizes ||W - Q^{-1}(Q(W))||_p^p for
p < 1 (robust to outliers) by alternating, for a growing penalty beta:

    W_e <- shrink_p(W - Q^{-1}(Q_z(W)), beta)        (generalized soft-thresholding)
    z   <- mean_g(Q_z(W) - (W - W_e) / s)             (closed form)

with shrink_p(x, beta) = sign(x)·relu(|x| - |x|^(p-1) / beta); stop as soon as the mean
absolute reconstruction error rises, and keep the best zero point seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LorqError
from ..options import opt
from .affine import as_groups, fit_affine, group_mask, qmax
from .base import FORMATS, FormatConfig, QuantFormat


@dataclass
class HQQConfig:
    hqq_iters: int = opt(20, "hqq: maximum optimization steps per matrix")
    hqq_lp_norm: float = opt(0.7, "hqq: p of the l_p reconstruction loss (p < 1 is robust to outliers)")
    hqq_beta: float = opt(10.0, "hqq: initial half-quadratic penalty")
    hqq_kappa: float = opt(1.01, "hqq: penalty growth per step")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding, the proximal step of the l_p penalty."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-12).pow(p - 1) / beta)


def hqq_zero(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, cfg: HQQConfig,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Optimized zero points (out, groups) for wg (out, groups, g) under fixed scales; mask
    (groups, g) marks real weights (a padded short last group must not count twice)."""
    mask = torch.ones_like(wg[0]) if mask is None else mask
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1).clone()
    beta, best_err, best_z = cfg.hqq_beta, float("inf"), z.clone()
    for _ in range(cfg.hqq_iters):
        wq = torch.round(wg / s + z).clamp(0, qmax(bits))
        wr = (wq - z) * s
        err = ((wg - wr).abs() * mask).sum().item() / (mask.sum().item() * wg.shape[0])
        if err >= best_err:
            break
        best_err, best_z = err, z.clone()
        we = shrink_lp(wg - wr, beta, cfg.hqq_lp_norm)
        z = ((wq - (wg - we) / s) * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True)
        beta *= cfg.hqq_kappa
    return best_z.squeeze(-1)


def quantize_hqq(w: torch.Tensor, cfg: FormatConfig, hcfg: HQQConfig):
    """An asymmetric int weight whose zero points HQQ optimized (scales stay min-max)."""
    if cfg.format is not QuantFormat.INT or cfg.symmetric:
        raise LorqError("hqq optimizes the zero point of asymmetric affine formats: use --format int --no-symmetric")
    group = cfg.group_for(w.shape[1])
    wg = as_groups(w, group)
    params = fit_affine(wg, cfg.bits, symmetric=False)
    scale = params["scale"].float()
    zero = hqq_zero(wg, scale, -params["min"].float() / scale, cfg.bits, hcfg, group_mask(w.shape[1], group, w.device))
    return FORMATS.get(cfg.format).from_params(w, cfg, {"scale": params["scale"], "min": (-zero * scale).to(torch.float16)})
