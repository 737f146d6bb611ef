"""Adapter parametrizations ("variants"): how an adapter turns its parameters into ΔW.

Every variant has the same surface, used by LoRALinear:
    delta(x, base_out, layer) -> (..., out)   added to the base output
    delta_weight(layer) -> (out, in)           the same update as a weight (for merging)
    set_init(B, A, R=None)                     start at scaling · B R A (R = I if None)
    begin_step(step, seed)                     per-step behaviour (DyLoRA's rank sampling)

- lora:     Hu et al. 2021, ΔW = s · B A (rsLoRA: s = alpha / sqrt(r), Kalajdzievski 2023).
- dora:     Liu et al. 2024, W' = m · (W + s B A) / ||W + s B A||_row, the norm detached (§4.3).
- dylora:   Valipour et al. 2023, nested ranks: each step trains the first b ~ U{1..r} ranks
            with s = alpha / b, so every rank <= r works at inference without retraining.
- core:     LoRA-XS (Bałazy et al. 2024) / LoRA-SB: B and A frozen, only an r×r core R trained,
            ΔW = s · B R A.
- nola:     Koohpayegani et al. 2024, A = Σ_k α_k A_k, B = Σ_k β_k B_k over frozen random bases.
- randlora: Albert et al. 2025, full-rank ΔW = s · Σ_i B_i Λ_i A Γ_i from frozen random bases,
            trainable diagonals Λ_i (r) and Γ_i (on the smaller dimension).

Random bases are generated from (shape, seed) and shared by every layer of that shape.
peqa and l4q, whose product is a quantized model, live in adapters/qat.py.
"""

from __future__ import annotations

import math
from enum import Enum
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LorqError
from ..quant.linear import tensors_key


class Variant(str, Enum):
    """How an adapter parametrizes its update."""

    LORA = "lora"
    DORA = "dora"
    DYLORA = "dylora"
    CORE = "core"
    NOLA = "nola"
    RANDLORA = "randlora"
    PEQA = "peqa"  # the scales of an INT-k base (adapters/qat.py)
    L4Q = "l4q"  # LoRA inside a learned-step-size quantizer (adapters/qat.py)


VARIANTS: dict[Variant, type] = {}


def register(variant: Variant):
    def deco(cls):
        cls.variant = variant
        VARIANTS[variant] = cls
        return cls
    return deco


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def compute_dtype_of(x: torch.Tensor, param: torch.Tensor) -> torch.dtype:
    return x.dtype if torch.is_autocast_enabled(x.device.type) else param.dtype


@lru_cache(maxsize=64)
def random_basis(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A frozen N(0, 1/fan_in) basis; the same tensor for the same (shape, seed)."""
    g = torch.Generator().manual_seed(seed * 7919 + hash(shape) % 100003)
    return torch.randn(shape, generator=g) / math.sqrt(shape[-1])


GAP_MARGIN = 6  # standard deviations of extra gaps drawn: a second draw is needed ~1e-9 of the time


def geometric(k: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """k draws of Geometric(p) on {1, 2, ...} by inversion, 1 + floor(log U / log(1 - p)) with
    U uniform on (0, 1]: vectorized, twice as fast as `geometric_` on the CPU."""
    u = torch.rand(k, dtype=torch.float64, device=device).neg_().add_(1)  # (0, 1]: log(0) never taken
    return u.log_().mul_(1 / math.log1p(-p)).floor_().add_(1).long()


def dropped_positions(n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The sorted positions in [0, n) that Bernoulli(p) trials drop, drawn as the gaps between
    them: geometric(p) (trials up to and including a success), so about p·n draws, not n."""
    parts, end = [torch.empty(0, dtype=torch.long, device=device)], -1  # end: the last position drawn so far
    while end < n - 1:
        mean = p * (n - 1 - end)  # drops expected in what is left: draw a few sigma more, then go on if short
        k = max(int(mean + GAP_MARGIN * math.sqrt(mean) + 16), 1)
        pos = geometric(k, p, device).cumsum_(0).add_(end)
        parts.append(pos)
        end = int(pos[-1])
    pos = torch.cat(parts) if len(parts) > 2 else parts[-1]
    return pos[pos < n]


class Dropout(nn.Module):
    """Inverted dropout that draws only the dropped positions (dropped_positions). At PEFT's
    p = 0.05: p·n draws instead of n/4 64-bit ones for 16-bit masks (themselves several times
    cheaper than `bernoulli_`, once the adapters' largest cost in a training step), 10-30% less
    time per dropped input forward and backward on SmolLM2's widths, and backward keeps the
    positions (8 bytes per dropped element, 0.4 per element) instead of a 1-byte mask. Kept
    values are scaled by 1 / (1 - p), p exactly.

    `share` = (rank, ranks) under data parallelism: every rank draws the positions of the whole
    micro-batch (their generators are seeded alike) and keeps its own contiguous rows, so the
    masks are those of one process training on the same global batch."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.share = (0, 1)

    @property
    def active(self) -> bool:
        return self.training and self.p > 0

    def kept(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x with dropped elements zeroed, not yet rescaled; the factor 1 / (1 - p) to apply):
        a linear map can take the factor on its smaller side."""
        if not self.active:
            return x, 1.0
        n, (rank, ranks) = x.numel(), self.share
        pos = dropped_positions(n * ranks, self.p, x.device)
        if ranks > 1:
            pos = pos[(pos >= rank * n) & (pos < (rank + 1) * n)] - rank * n
        return x.reshape(-1).index_fill(0, pos, 0).view(x.shape), 1 / (1 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, rescale = self.kept(x)
        return kept * rescale if rescale != 1.0 else kept

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Adapter(nn.Module):
    """Common fields: rank, alpha, rslora, scaling, dropout on the adapter's input."""

    variant: Variant
    trainable_names: tuple[str, ...] = ()
    bank_names: tuple[str, ...] = ()  # frozen random bases shared by layers of one shape
    no_decay_names: tuple[str, ...] = ()  # trained tensors whose "no change" is not 0 (no weight decay)

    def __init__(self, layer, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0):  # unknown options: TypeError
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.dropout = Dropout(dropout)

    def begin_step(self, step: int, seed: int) -> None:
        pass

    def options(self) -> dict:
        """Variant-specific construction options (exported with the adapter)."""
        return {}

    def set_init(self, B: torch.Tensor, A: torch.Tensor, R: torch.Tensor | None = None) -> None:
        raise LorqError(f"the {self.variant.value} variant cannot start from given factors; use --init gaussian")

    def after_init(self, layer) -> None:
        """Called once the factors (and the base) are final."""

    # True: `output(x, layer)` computes base(x) + the update itself (LoRALinear calls it when
    # the adapter is the only one active), so it can share the base's matmul
    owns_base = False

    def output(self, x: torch.Tensor, layer) -> torch.Tensor:
        raise NotImplementedError

    def add_delta(self, out: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        """out + delta(x): what LoRALinear adds per adapter (variants may fuse the addition)."""
        return out + self.delta(x, base_out, layer).to(out.dtype)


@register(Variant.LORA)
class LowRankAdapter(Adapter):
    """ΔW = scaling · B A, applied as scaling · B(A(dropout(x))); B = 0 so training starts at the base."""

    trainable_names = ("A", "B")

    def __init__(self, layer, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0, **kw):
        super().__init__(layer, rank, alpha, rslora, dropout, **kw)
        self.A = nn.Parameter(torch.empty(rank, self.in_features))
        self.B = nn.Parameter(torch.zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B (out, r), A (r, in), scaling) in use now."""
        return self.B, self.A, self.scaling

    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, A, scaling) as exported (at inference rank)."""
        return self.B, self.A, self.scaling

    def delta_weight(self, layer=None) -> torch.Tensor:
        B, A, s = self.factors()
        return s * (B @ A)  # (out, in)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """s · A dropout(x) (..., r): the scalings are applied on the rank-r side, the cheap one."""
        B, A, s = self.factors()
        kept, rescale = self.dropout.kept(x.to(compute_dtype_of(x, A)))  # the mask drawn in the compute dtype
        return F.linear(kept, A) * (s * rescale)

    def lowrank(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.down(x), self.factors()[0])  # (..., out)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        return self.lowrank(x)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        """The fused LoRA path: out + (s · A x) Bᵀ as one addmm (no (..., out) intermediate)."""
        h, B = self.down(x), self.factors()[0]
        if h.dtype != out.dtype and not torch.is_autocast_enabled(out.device.type):
            return out + F.linear(h, B).to(out.dtype)
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.t()).view(out.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank(x)

    @torch.no_grad()
    def set_init(self, B: torch.Tensor, A: torch.Tensor, R: torch.Tensor | None = None) -> None:
        self.A.copy_(A.to(self.A.dtype))
        self.B.copy_((B @ R if R is not None else B).to(self.B.dtype))


def base_weight(layer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's frozen base weight (out, in), dequantized if quantized."""
    base = layer.base
    return base.weight.to(dtype) if isinstance(base, nn.Linear) else base.dequantize(dtype)


def base_bias(layer) -> torch.Tensor | None:
    return getattr(layer.base, "bias", None)


@register(Variant.DORA)
class DoRAAdapter(LowRankAdapter):
    """W' = m ⊙ (W + s B A) / ||W + s B A||_row (norm detached); m starts at ||W||_row.

    The norm is expanded, ||W + s B A||² = ||W||² + 2s Σ_j B ⊙ (W Aᵀ) + s² Σ_j B ⊙ (B A Aᵀ) per
    row: ||W||² is the frozen base's (computed once), and W Aᵀ comes from A's r rows pushed
    through the base's own matmul beside the input, so a quantized weight is dequantized once
    per forward (and once in backward), as for plain LoRA."""

    add_delta = Adapter.add_delta  # its delta is not the plain low-rank product
    owns_base = True

    trainable_names = ("A", "B", "magnitude")
    no_decay_names = ("magnitude",)

    def __init__(self, layer, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0, **kw):
        super().__init__(layer, rank, alpha, rslora, dropout, **kw)
        self.magnitude = nn.Parameter(torch.zeros(self.out_features))
        self.base_norm = None  # (identity of the base's tensors, ||W||² per row)
        self.reset_magnitude(layer)

    @torch.no_grad()
    def reset_magnitude(self, layer) -> None:
        w = base_weight(layer)
        w = w + LowRankAdapter.delta_weight(self).float().to(w.device)
        self.magnitude.copy_(torch.linalg.vector_norm(w, dim=1))

    def base_norm_sq(self, layer) -> torch.Tensor:
        """||W||² per row of the base weight, recomputed only when the base's tensors change
        (a merge into a dense base bumps their version, a load or a move replaces them)."""
        key = tensors_key([*layer.base.parameters(), *layer.base.buffers()])
        if self.base_norm is None or self.base_norm[0] != key:
            with torch.no_grad():
                self.base_norm = (key, base_weight(layer).square().sum(1))
        return self.base_norm[1]

    @torch.no_grad()
    def row_norm(self, layer, a_out: torch.Tensor) -> torch.Tensor:
        """||W + s B A||_row (fp32) from base(A) (r, out), the base applied to A's rows."""
        B, A, s = self.factors()
        bias = base_bias(layer)
        wa = (a_out.float() - bias.float() if bias is not None else a_out.float()).T  # W Aᵀ (out, r)
        B, A = B.float(), A.float()
        sq = self.base_norm_sq(layer) + 2 * s * (B * wa).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
        return sq.clamp_min(0).sqrt()

    def update(self, dropped_out: torch.Tensor, x: torch.Tensor, norm: torch.Tensor, layer) -> torch.Tensor:
        """(m / norm - 1) W x + (m / norm) s B A x, for the (dropped) input x whose base output
        is dropped_out: what DoRA adds to base(x)."""
        dtype = compute_dtype_of(x, self.A)
        scale = self.magnitude.to(dtype) / norm.to(dtype)
        bias = base_bias(layer)
        plain = dropped_out - bias.to(dropped_out.dtype) if bias is not None else dropped_out  # W x
        lora = F.linear(F.linear(x.to(dtype), self.A), self.B) * self.scaling
        return (scale - 1) * plain.to(dtype) + scale * lora

    def output(self, x: torch.Tensor, layer) -> torch.Tensor:
        """x, its dropped copy (dropout applies to both terms, as PEFT does) and A go through the
        base as one batch of rows: one matmul with the base weight."""
        n = x.shape[:-1].numel()
        flat = x.reshape(n, x.shape[-1])
        rows = [flat, self.dropout(flat)] if self.dropout.active else [flat]
        y = layer.base(torch.cat([*rows, self.A.detach().to(flat.dtype)]))
        k = len(rows) * n
        base_out, dropped_out = y[:n], y[k - n : k]  # base(x), base(dropped x) (the same rows without dropout)
        norm = self.row_norm(layer, y[k:])
        out = base_out + self.update(dropped_out, rows[-1], norm, layer).to(base_out.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        """Beside other adapters (LoRALinear applies each to base(x)): the base runs again on A
        and, in training, on the dropped input (through the base layer itself: a quantized one
        dequantizes inside its own matmul and keeps no float weight for backward)."""
        dtype = compute_dtype_of(x, self.A)
        norm = self.row_norm(layer, layer.base(self.A.detach().to(dtype)))
        if self.dropout.active:
            x = self.dropout(x)
            base_out = layer.base(x.to(dtype))
        return self.update(base_out, x, norm, layer)

    def delta_weight(self, layer=None) -> torch.Tensor:
        if layer is None:
            raise LorqError("a DoRA update depends on the base weight")
        w = base_weight(layer)
        merged = w + super().delta_weight().float()
        return (self.magnitude.float() / torch.linalg.vector_norm(merged, dim=1))[:, None] * merged - w

    def after_init(self, layer) -> None:
        self.reset_magnitude(layer)


@register(Variant.DYLORA)
class DyLoRAAdapter(LowRankAdapter):
    """Nested ranks: training uses the first b ranks (b sampled per step), inference `eval_rank`."""

    def __init__(self, layer, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0, **kw):
        super().__init__(layer, rank, alpha, rslora, dropout, **kw)
        self.train_rank = rank
        self.eval_rank = rank

    def begin_step(self, step: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed * 1000003 + step)  # one b per step for all layers
        self.train_rank = int(torch.randint(1, self.rank + 1, (1,), generator=g))

    def set_rank(self, rank: int) -> None:
        if not 1 <= rank <= self.rank:
            raise LorqError(f"DyLoRA rank must be in 1..{self.rank}, got {rank}")
        self.eval_rank = rank

    def factors(self):
        b = self.train_rank if self.training else self.eval_rank
        return self.B[:, :b], self.A[:b], lora_scaling(self.alpha, b, self.rslora)

    def export_factors(self):
        b = self.eval_rank
        return self.B[:, :b], self.A[:b], lora_scaling(self.alpha, b, self.rslora)


@register(Variant.CORE)
class CoreAdapter(Adapter):
    """ΔW = s · B R A with B, A frozen and only R (r, r) trained.

    Without given factors B and A come from the base weight's truncated SVD (LoRA-XS):
    B = U_r S_r, A = V_rᵀ, and R = 0 so training starts at the base.
    """

    trainable_names = ("R",)

    def __init__(self, layer, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0, **kw):
        if rank > min(layer.out_features, layer.in_features):  # the SVD has no more factors than that
            raise LorqError(f"the core variant's rank {rank} exceeds the smaller dimension of a {layer.out_features}x{layer.in_features} "
                            f"layer ({min(layer.out_features, layer.in_features)}); lower --rank")
        super().__init__(layer, rank, alpha, rslora, dropout, **kw)
        with torch.no_grad():
            U, S, Vh = torch.linalg.svd(base_weight(layer), full_matrices=False)
        self.register_buffer("B", (U[:, :rank] * S[:rank]).contiguous())  # (out, r)
        self.register_buffer("A", Vh[:rank].contiguous())  # (r, in)
        self.R = nn.Parameter(torch.zeros(rank, rank))

    def delta_weight(self, layer=None) -> torch.Tensor:
        return self.scaling * (self.B @ self.R @ self.A)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        dtype = compute_dtype_of(x, self.R)
        h = F.linear(F.linear(self.dropout(x.to(dtype)), self.A.to(dtype)), self.R)  # (..., r)
        return F.linear(h, self.B.to(dtype)) * self.scaling

    @torch.no_grad()
    def set_init(self, B, A, R=None) -> None:
        self.B.copy_(B)
        self.A.copy_(A)
        self.R.copy_(R if R is not None else torch.eye(self.rank))


@register(Variant.NOLA)
class NOLAAdapter(Adapter):
    """A = Σ_k α_k A_k, B = Σ_k β_k B_k over k frozen random bases; only α, β (k each) train."""

    trainable_names = ("alpha_coef", "beta_coef")
    bank_names = ("A_bank", "B_bank")

    def __init__(self, layer, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0,
                 nola_bases: int = 64, basis_seed: int = 0, **kw):
        super().__init__(layer, rank, alpha, rslora, dropout, **kw)
        if nola_bases <= 0:
            raise LorqError(f"nola-bases must be positive, got {nola_bases}")
        self.k, self.basis_seed = nola_bases, basis_seed
        self.register_buffer("A_bank", random_basis((nola_bases, rank, self.in_features), basis_seed), persistent=False)
        self.register_buffer("B_bank", random_basis((nola_bases, self.out_features, rank), basis_seed + 1), persistent=False)
        g = torch.Generator().manual_seed(basis_seed)
        self.alpha_coef = nn.Parameter(torch.randn(nola_bases, generator=g) / math.sqrt(nola_bases))
        self.beta_coef = nn.Parameter(torch.zeros(nola_bases))  # B = 0: training starts at the base

    def options(self) -> dict:
        return {"nola_bases": self.k, "basis_seed": self.basis_seed}

    def mixed(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = torch.einsum("k,kri->ri", self.alpha_coef, self.A_bank)  # (r, in)
        B = torch.einsum("k,kor->or", self.beta_coef, self.B_bank)  # (out, r)
        return B, A

    def delta_weight(self, layer=None) -> torch.Tensor:
        B, A = self.mixed()
        return self.scaling * (B @ A)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        B, A = self.mixed()
        dtype = compute_dtype_of(x, A)
        return F.linear(F.linear(self.dropout(x.to(dtype)), A.to(dtype)), B.to(dtype)) * self.scaling


@register(Variant.RANDLORA)
class RandLoRAAdapter(Adapter):
    """Full-rank ΔW = s · Σ_{i<N} L_i Λ_i S Γ_i (written for the out ≥ in orientation; transposed
    otherwise), N = ceil(min(in, out) / r): L_i (max, r) and S (r, min) frozen random,
    Λ_i = diag(λ_i) (r) and Γ_i = diag(γ_i) (min) trained. λ = 0 so training starts at the base."""

    trainable_names = ("lam", "gamma")
    bank_names = ("S", "L")
    no_decay_names = ("gamma",)

    def __init__(self, layer, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0,
                 basis_seed: int = 0, **kw):
        super().__init__(layer, rank, alpha, rslora, dropout, **kw)
        small, large = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        self.n_bases, self.basis_seed = math.ceil(small / rank), basis_seed
        self.register_buffer("S", random_basis((rank, small), basis_seed + 2), persistent=False)
        self.register_buffer("L", random_basis((self.n_bases, large, rank), basis_seed + 3), persistent=False)
        self.lam = nn.Parameter(torch.zeros(self.n_bases, rank))
        self.gamma = nn.Parameter(torch.full((self.n_bases, small), 1.0 / large))

    def options(self) -> dict:
        return {"basis_seed": self.basis_seed}

    def sides(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (out, N r), right (N r, in)) with ΔW = s · left @ right."""
        scaled = self.lam.to(dtype)[:, :, None] * self.S.to(dtype)[None] * self.gamma.to(dtype)[:, None, :]  # (N, r, small)
        bank = self.L.to(dtype)  # (N, large, r)
        if self.in_features <= self.out_features:
            return bank.permute(1, 0, 2).reshape(self.out_features, -1), scaled.reshape(-1, self.in_features)
        return scaled.permute(2, 0, 1).reshape(self.out_features, -1), bank.transpose(1, 2).reshape(-1, self.in_features)

    def delta_weight(self, layer=None) -> torch.Tensor:
        left, right = self.sides(self.lam.dtype)
        return self.scaling * (left @ right)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        dtype = compute_dtype_of(x, self.lam)
        left, right = self.sides(dtype)
        return F.linear(F.linear(self.dropout(x.to(dtype)), right), left) * self.scaling


def make_adapter(variant: Variant, layer, rank: int, alpha: float, rslora: bool, dropout: float, **options) -> Adapter:
    return VARIANTS[Variant(variant)](layer, rank, alpha, rslora, dropout, **options)


from . import qat  # noqa: E402,F401  (registers peqa and l4q)
