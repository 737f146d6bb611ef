"""W ≈ Q + L1·L2: quantization plus a low-rank part that absorbs what quantization loses.

Each decomposition takes the float weight W (out, in), a rank r and `quantize` (any format and
algorithm of the suite, W -> QuantizedWeight) and returns (Q, L1 (out, r), L2 (r, in)):

- LoRC (Yao et al., ZeroQuant-V2, 2023): Q = quant(W), L = SVD_r(W - Q).
- QPiSSA (Meng et al., PiSSA, 2024 §4): L = SVD_r(W) (principal components kept in high
  precision), Q = quant(W - L).
- LoftQ (Li et al., 2023, Alg. 1): from L_0 = 0, T alternations Q_t = quant(W - L_{t-1}),
  L_t = SVD_r(W - Q_t).
- LQ-LoRA (Guo et al., 2024, Alg. 1): from Q_0 = 0 (so L_1 = SVD_r(W)), L_t = SVD_r(W - Q_{t-1})
  by randomized SVD, Q_t = quant(W - L_t), stopped as soon as ||W - Q - L|| rises; the best
  iterate is kept.
- EoRA (Liu et al., 2024): Q = quant(W); with the input covariance H = X Xᵀ = V Λ Vᵀ, project
  ΔW = W - Q into the eigenspace scaled by √Λ, take its rank-r SVD and project back, so
  ‖(ΔW - L1 L2) X‖ (the layer-output error) is minimized instead of ‖ΔW - L1 L2‖.

Fisher weighting (LQ-LoRA §3.3): with row/column weights d_r, d_c (from squared gradients),
the SVD minimizes ‖diag(d_r)(E - L1 L2)diag(d_c)‖ instead (exact for a rank-1 Fisher).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from ..errors import LorqError
from ..options import opt


class LowRankMethod(str, Enum):
    """Which decomposition fills the low-rank part."""

    NONE = "none"
    LOFTQ = "loftq"
    LQ_LORA = "lq-lora"
    QPISSA = "qpissa"
    LORC = "lorc"
    EORA = "eora"


FACTOR_DTYPE = torch.float16  # storage of L1, L2 (counted in bits/weight); computed in fp32


@dataclass
class LowRankConfig:
    lowrank: LowRankMethod = opt(LowRankMethod.NONE, "low-rank compensation W ≈ Q + L1·L2: none, loftq, lq-lora, qpissa, lorc or eora (eora needs calibration)")
    lowrank_iters: int = opt(5, "loftq: alternations; lq-lora: most alternations (stops when the error rises)")
    fisher: bool = opt(False, "weight the SVD by each row's and column's squared gradients on calibration batches (LQ-LoRA's Fisher-weighted SVD)")

    def validate(self) -> "LowRankConfig":
        try:
            self.lowrank = LowRankMethod(self.lowrank)
        except ValueError:
            raise LorqError(f"unknown low-rank method {self.lowrank!r} (known: {', '.join(m.value for m in LowRankMethod)})")
        if self.lowrank_iters <= 0:
            raise LorqError(f"lowrank-iters must be positive, got {self.lowrank_iters}")
        return self


@dataclass
class Context:
    """What a decomposition may use besides W: iterations, Fisher row/column weights, H."""

    iters: int = 5
    row_weight: torch.Tensor | None = None  # (out,)
    col_weight: torch.Tensor | None = None  # (in,)
    hessian: torch.Tensor | None = None  # (in, in), ∝ X Xᵀ
    codes: object | None = None  # LoftQ: a QuantizedWeight to start from instead of L = 0 (merging: the base's)

    def weighted(self) -> bool:
        return self.row_weight is not None


Quantize = Callable[[torch.Tensor], object]  # float W (out, in) -> QuantizedWeight


def split_balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U S Vᵀ -> (U √S, √S Vᵀ): both factors of similar scale (good for fp16 and as a LoRA init)."""
    root = s.clamp_min(0).sqrt()
    return u * root, root.unsqueeze(1) * vh  # (out, r), (r, in)


def randomized_svd(e: torch.Tensor, k: int, niter: int = 4, seed: int = 0):
    """Halko, Martinsson & Tropp (2011), Alg. 4.4 + 5.1: an orthonormal basis Q of the range of
    e·Ω, refined by subspace iterations, then the SVD of the small Qᵀe. Seeded: reproducible."""
    g = torch.Generator(device=e.device).manual_seed(seed)
    omega = torch.randn(e.shape[1], k, generator=g, device=e.device)  # (in, k)
    q = torch.linalg.qr(e @ omega).Q  # (out, k)
    for _ in range(niter):
        q = torch.linalg.qr(e @ torch.linalg.qr(e.t() @ q).Q).Q
    ub, s, vh = torch.linalg.svd(q.t() @ e, full_matrices=False)  # (k, in)
    return q @ ub, s, vh


def svd_r(e: torch.Tensor, r: int, randomized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation of e as (L1, L2); randomized (Halko et al.) for LQ-LoRA."""
    e = e.float()
    r = min(r, *e.shape)
    u, s, vh = randomized_svd(e, min(r + 8, *e.shape)) if randomized else torch.linalg.svd(e, full_matrices=False)
    return split_balanced(u[:, :r], s[:r], vh[:r])


def weighted_svd_r(e: torch.Tensor, r: int, ctx: Context, randomized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin ‖diag(d_r)(e - L1 L2)diag(d_c)‖_F: SVD of the scaled matrix, scaled back."""
    if not ctx.weighted():
        return svd_r(e, r, randomized)
    dr, dc = ctx.row_weight.float(), ctx.col_weight.float()
    l1, l2 = svd_r(dr.unsqueeze(1) * e.float() * dc, r, randomized)
    return l1 / dr.unsqueeze(1), l2 / dc


def dequant(qw) -> torch.Tensor:
    return qw.dequantize(torch.float32)


def round_factors(l1: torch.Tensor, l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as stored (fp16), so every error reported is the error of what is saved."""
    return l1.to(FACTOR_DTYPE), l2.to(FACTOR_DTYPE)


def residual_sq(w: torch.Tensor, q: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor, ctx: Context) -> float:
    """‖W - Q - L1 L2‖² for dequantized Q (Fisher-weighted when the context has weights)."""
    e = w.float() - q - l1.float() @ l2.float()
    if ctx.weighted():
        e = ctx.row_weight.float().unsqueeze(1) * e * ctx.col_weight.float()
    return e.pow(2).sum().item()


def lorc(w: torch.Tensor, r: int, quantize: Quantize, ctx: Context):
    qw = quantize(w)
    return (qw, *weighted_svd_r(w.float() - dequant(qw), r, ctx))


def qpissa(w: torch.Tensor, r: int, quantize: Quantize, ctx: Context):
    l1, l2 = round_factors(*weighted_svd_r(w, r, ctx))
    return quantize(w.float() - l1.float() @ l2.float()), l1, l2


def alternate(w: torch.Tensor, r: int, quantize: Quantize, ctx: Context, randomized: bool, stop_on_rise: bool, svd_first: bool):
    """Alternate Q = quant(W - L) and L = SVD_r(W - Q), starting with L = 0 (quantize first), with
    Q = 0 (svd_first), or with the given ctx.codes; the best (Q, L) seen is kept."""
    w = w.float()
    best, best_err = None, float("inf")

    def improved(qw, q, l1, l2) -> bool:
        """Keep (Q, L) if it is the best so far; False when the error rose and that ends the run."""
        nonlocal best, best_err
        err = residual_sq(w, q, l1, l2, ctx)
        if err < best_err:
            best, best_err = (qw, l1, l2), err
            return True
        return not stop_on_rise

    if ctx.codes is not None:
        q = dequant(ctx.codes)
        l1, l2 = round_factors(*weighted_svd_r(w - q, r, ctx, randomized))
        improved(ctx.codes, q, l1, l2)
    elif svd_first:
        l1, l2 = round_factors(*weighted_svd_r(w, r, ctx, randomized))
    else:
        l1, l2 = w.new_zeros(w.shape[0], r), w.new_zeros(r, w.shape[1])
    for _ in range(ctx.iters):
        qw = quantize(w - l1.float() @ l2.float())
        q = dequant(qw)
        if not improved(qw, q, l1, l2):
            break
        l1, l2 = round_factors(*weighted_svd_r(w - q, r, ctx, randomized))
        if not improved(qw, q, l1, l2):
            break
    return best


def loftq(w: torch.Tensor, r: int, quantize: Quantize, ctx: Context):
    return alternate(w, r, quantize, ctx, randomized=False, stop_on_rise=False, svd_first=False)


def lq_lora(w: torch.Tensor, r: int, quantize: Quantize, ctx: Context):
    return alternate(w, r, quantize, ctx, randomized=True, stop_on_rise=True, svd_first=True)


def eora(w: torch.Tensor, r: int, quantize: Quantize, ctx: Context):
    if ctx.hessian is None:
        raise LorqError("eora needs the layer's input covariance (calibration data)")
    qw = quantize(w)
    dw = w.float() - dequant(qw)  # (out, in)
    lam, v = torch.linalg.eigh(ctx.hessian.double())
    lam = lam.clamp_min(lam.max() * 1e-8).float()  # dead inputs: tiny, not zero, so Λ^-1/2 stays finite
    v = v.float()
    root = lam.sqrt()
    l1, m = svd_r(dw @ (v * root), r)  # (out, r), (r, in) in the scaled eigenbasis
    return qw, l1, (m / root) @ v.t()  # L2 = M Λ^-1/2 Vᵀ


DECOMPOSITIONS: dict[LowRankMethod, Callable] = {
    LowRankMethod.LORC: lorc,
    LowRankMethod.QPISSA: qpissa,
    LowRankMethod.LOFTQ: loftq,
    LowRankMethod.LQ_LORA: lq_lora,
    LowRankMethod.EORA: eora,
}


def decompose(method: LowRankMethod, w: torch.Tensor, r: int, quantize: Quantize, ctx: Context):
    """(Q, L1 (out, r), L2 (r, in)) with the factors in their storage dtype."""
    if r <= 0:
        raise LorqError(f"a low-rank decomposition needs rank >= 1, got {r}")
    qw, l1, l2 = DECOMPOSITIONS[LowRankMethod(method)](w, r, quantize, ctx)
    return (qw, *round_factors(l1, l2))


def factor_nbytes(out_features: int, in_features: int, r: int) -> int:
    return r * (out_features + in_features) * torch.finfo(FACTOR_DTYPE).bits // 8
