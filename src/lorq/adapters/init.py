"""Adapter initializations: where the adapter starts, and what the base keeps.

An init maps a dense base weight W (and, for gradient-based ones, the full-fine-tuning gradient
G = ∂L/∂W averaged over a few batches) to a `Start`: factors with scaling · B R A, and whether
that product is subtracted from the base (so the model is unchanged at step 0). Inits run on
the dense weights before quantization, so on a quantized base the residual is what gets
quantized (as QPiSSA does).

- gaussian: plain LoRA (A Kaiming-uniform, B = 0); nothing to compute.
- pissa:   Meng et al. 2024: W = U S Vᵀ, s·B A = U_r S_r V_rᵀ (B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ),
           the base keeps the residual. Fast randomized SVD (Halko et al.) with --svd-iters > 0.
- olora:   Büyükakyüz 2024: W = Q R, B = Q[:, :r], A = R[:r], the base keeps W - s·B A.
- nlora:   a two-sided Nyström-type sketch of W's principal subspace (no SVD of W), split like PiSSA.
- lora-ga: Wang et al. 2024: G = U S Vᵀ; A = c·V[:, :r]ᵀ, B = c·U[:, r:2r] (PEFT's recommended
           "ArB2r" directions), c = d_out^¼ / √γ on both factors and no S, as in the paper (PEFT's
           implementation also multiplies B by S); residual kept.
- lora-sb: Ponkshe et al. 2024: a normalized first full-fine-tuning step ΔW₀ = -η·G / rms(G) =
           U S Vᵀ (the gradient's direction, η = --sb-step per entry, a full-FT learning rate: the
           adapter's own learning rate, 100× larger, made the init wreck the model);
           B = U_r, A = V_rᵀ (frozen, `core` variant), core R = S_r / s; the model starts at W + ΔW₀'s
           best rank-r approximation (no residual).

LoftQ / LQ-LoRA / QPiSSA / LoRC / EoRA (lorq.quant.lowrank) leave W ≈ Q + L1 L2. Used as the
LoRA initialization, the adapter starts at scaling · B A = L1 L2 (A = L2, B = L1 / scaling), so
fine-tuning starts from the compensated model, and the base keeps only Q. The adapter then
belongs to that Q, which is saved beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
import torch.nn as nn

from ..errors import LorqError
from ..options import NON_NEGATIVE, POSITIVE, check_ranges, opt
from ..quant.linear import QuantizedLinear, match_modules
from .lora import LoRAConfig, lora_layers, lora_scaling
from .variants import Variant


class LoRAInit(str, Enum):
    """Where a new adapter starts."""

    GAUSSIAN = "gaussian"
    PISSA = "pissa"
    OLORA = "olora"
    NLORA = "nlora"
    LORA_GA = "lora-ga"
    LORA_SB = "lora-sb"


@dataclass
class InitConfig:
    """Options of the adapter initialization."""

    init: LoRAInit = opt(LoRAInit.GAUSSIAN, "adapter initialization: gaussian (plain LoRA), pissa, olora, nlora (Nyström), lora-ga (gradient-aligned), lora-sb (gradient SVD, trains an r×r core)")
    svd_iters: int = opt(4, "pissa / lora-ga / lora-sb: subspace iterations of the randomized SVD (0 = exact SVD)")
    init_batches: int = opt(8, "lora-ga / lora-sb: micro-batches over which the full-fine-tuning gradient is averaged")
    ga_gamma: float = opt(16.0, "lora-ga: γ of the stable scale c = d_out^(1/4) / sqrt(γ)")
    sb_step: float = opt(1e-5, "lora-sb: per-weight size (RMS) of the full-fine-tuning first step the init approximates (a full fine-tuning learning rate, not the adapter's)")

    def validate(self) -> "InitConfig":
        self.init = LoRAInit(self.init)
        check_ranges(self, {"svd_iters": NON_NEGATIVE, "init_batches": POSITIVE, "ga_gamma": POSITIVE, "sb_step": POSITIVE})
        return self


@dataclass
class Start:
    """An adapter's initial factors: ΔW₀ = scaling · B R A (R = I when None)."""

    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in)
    R: torch.Tensor | None = None  # (r, r)
    residual: bool = True  # the base keeps W - ΔW₀, so the model is unchanged at step 0

    def delta(self, scaling: float) -> torch.Tensor:
        B = self.B @ self.R if self.R is not None else self.B
        return scaling * (B @ self.A)  # (out, in)


InitFn = Callable[[torch.Tensor, "torch.Tensor | None", int, float, InitConfig, float], Start]
INITS: dict[LoRAInit, InitFn] = {}
NEEDS_GRADIENT = {LoRAInit.LORA_GA, LoRAInit.LORA_SB}
RESIDUAL_INITS = {LoRAInit.PISSA, LoRAInit.OLORA, LoRAInit.NLORA, LoRAInit.LORA_GA}  # the base keeps W - ΔW₀


def register_init(kind: LoRAInit):
    def deco(fn: InitFn) -> InitFn:
        INITS[kind] = fn
        return fn
    return deco


def balanced(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, scaling: float) -> Start:
    """s · B A = U diag(S) Vᵀ with the singular values split evenly: B = U √(S/s), A = √(S/s) Vᵀ."""
    root = (S / scaling).sqrt()
    return Start(B=U * root, A=root[:, None] * V.T)


def top_svd(M: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets (U (m, k), S (k,), V (n, k)): randomized (Halko et al. 2011,
    k + 8 + k oversampling, `iters` subspace iterations) or exact with iters = 0.

    The sketch comes from its own generator seeded by the shape, not the global RNG, so calling
    it does not shift dropout or data order (runs stay resumable bit for bit)."""
    q = 2 * k + 8
    if iters <= 0 or q >= min(M.shape):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].T
    g = torch.Generator(device=M.device).manual_seed(M.shape[0] * 100003 + M.shape[1])
    Y = M @ torch.randn(M.shape[1], q, generator=g, device=M.device, dtype=M.dtype)  # (m, q)
    for _ in range(iters):  # power iterations sharpen a slowly decaying spectrum
        Q, _ = torch.linalg.qr(Y)
        Y = M @ (M.T @ Q)
    Q, _ = torch.linalg.qr(Y)
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)  # (q, n) is small
    return (Q @ Ub)[:, :k], S[:k], Vh[:k].T


@register_init(LoRAInit.PISSA)
def pissa(W, G, rank, scaling, cfg) -> Start:
    return balanced(*top_svd(W, rank, cfg.svd_iters), scaling)


@register_init(LoRAInit.OLORA)
def olora(W, G, rank, scaling, cfg) -> Start:
    Q, R = torch.linalg.qr(W)  # W (out, in) = Q (out, k) R (k, in)
    return Start(B=Q[:, :rank].contiguous(), A=R[:rank].contiguous())


@register_init(LoRAInit.NLORA)
def nlora(W, G, rank, scaling, cfg) -> Start:
    """Two-sided Nyström-type sketch W ≈ Q_Y (Q_Yᵀ W Q_Z) Q_Zᵀ, Y = W Ω, Z = Wᵀ Ψ (2r columns each),
    truncated to rank r by the SVD of the 2r×2r middle. The textbook generalized Nyström form
    (WΩ)(ΨᵀWΩ)⁺(ΨᵀW) has a pseudo-inverse that blew up on SmolLM2's flat spectra (a rank-16
    approximation 47× the norm of W); with orthonormalized sketches the approximation is a
    projection of W and can never exceed it."""
    k = min(2 * rank, *W.shape)
    g = torch.Generator().manual_seed(W.shape[0] * 31 + W.shape[1])
    omega = torch.randn(W.shape[1], k, generator=g).to(W.device)  # (in, k)
    psi = torch.randn(W.shape[0], k, generator=g).to(W.device)  # (out, k)
    qy, _ = torch.linalg.qr(W @ omega)  # (out, k)
    qz, _ = torch.linalg.qr(W.T @ psi)  # (in, k)
    u, S, vh = torch.linalg.svd(qy.T @ W @ qz)  # (k, k) middle
    return balanced(qy @ u[:, :rank], S[:rank], qz @ vh[:rank].T, scaling)


@register_init(LoRAInit.LORA_GA)
def lora_ga(W, G, rank, scaling, cfg) -> Start:
    if 2 * rank > min(G.shape):
        raise LorqError(f"lora-ga needs 2r = {2 * rank} <= min(out, in) = {min(G.shape)}")
    U, S, V = top_svd(G, 2 * rank, cfg.svd_iters)
    c = W.shape[0] ** 0.25 / math.sqrt(cfg.ga_gamma)
    return Start(B=c * U[:, rank : 2 * rank].contiguous(), A=c * V[:, :rank].T.contiguous())


@register_init(LoRAInit.LORA_SB)
def lora_sb(W, G, rank, scaling, cfg) -> Start:
    step = -cfg.sb_step * G / G.pow(2).mean().sqrt().clamp_min(1e-12)  # the gradient's direction, a full-FT step size (out, in)
    U, S, V = top_svd(step, rank, cfg.svd_iters)
    return Start(B=U.contiguous(), A=V.T.contiguous(), R=torch.diag(S) / scaling, residual=False)


def full_gradients(model: nn.Module, modules: list[str], batches: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """G = ∂L/∂W of each module's weight, L the mean next-token loss over `batches` of
    (input_ids, labels) or (input_ids, labels, position_ids or None), as training runs them."""
    from ..eval.perplexity import next_token_nll  # eval imports adapters: import on use

    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {m: model.get_submodule(m).weight for m in modules}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    was_training = model.training
    model.train()
    try:
        n_tokens = 0
        for x, y, *pos in batches:
            nll, n = next_token_nll(model, x, y, position_ids=pos[0] if pos else None)
            nll.backward()
            n_tokens += n
        return {m: w.grad.detach().float() / max(n_tokens, 1) for m, w in weights.items()}
    finally:
        for w in weights.values():
            w.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


@torch.no_grad()
def compute_starts(model: nn.Module, lora: LoRAConfig, cfg: InitConfig,
                   batches: Callable[[], list] | None = None, progress: bool = True) -> dict[str, Start]:
    """The init's Start of every target layer of a dense model; residual inits are subtracted
    from the base weights in place (so that quantizing the model afterwards quantizes W - ΔW₀)."""
    cfg.validate()
    if cfg.init is LoRAInit.GAUSSIAN:
        return {}
    if Variant(lora.variant) in (Variant.NOLA, Variant.RANDLORA):
        raise LorqError(f"--init {cfg.init.value} does not apply to the {Variant(lora.variant).value} variant (its bases are random by design); use --init gaussian")
    modules = match_modules(model, lora.targets, (nn.Linear,))
    if not modules:
        raise LorqError(f"--init {cfg.init.value} needs a dense base: no nn.Linear matches {lora.targets}")
    grads = {}
    if cfg.init in NEEDS_GRADIENT:
        with torch.enable_grad():
            grads = full_gradients(model, modules, batches())
    scaling = lora_scaling(lora.alpha, lora.rank, lora.rslora)
    starts = {}
    from tqdm.auto import tqdm

    for m in tqdm(modules, desc=f"init {cfg.init.value}", unit="layer", disable=not progress):
        W = model.get_submodule(m).weight.detach().float()
        if lora.rank > min(W.shape):
            raise LorqError(f"rank {lora.rank} exceeds {m}'s smaller dimension {min(W.shape)}")
        starts[m] = INITS[cfg.init](W, grads.get(m), lora.rank, scaling, cfg)
    shared = shared_weights(model)
    tied = sorted(m for m in shared if m in starts and starts[m].residual)
    if tied:  # W - ΔW₀ would change the other user of the weight too (a tied input embedding)
        raise LorqError(f"--init {cfg.init.value} subtracts its start from the base weight, and {tied[0]}'s weight is shared "
                        f"with {', '.join(sorted(shared[tied[0]] - {tied[0]}))}; leave {tied[0]} out of --targets")
    for m, start in starts.items():  # only once every start is known: a refused run leaves the model as it was
        if start.residual:
            weight = model.get_submodule(m).weight
            weight.copy_((weight.detach().float() - start.delta(scaling)).to(weight.dtype))
    return starts


def shared_weights(model: nn.Module) -> dict[str, set[str]]:
    """Modules whose weight is also another module's (tied embeddings): name -> every user's name."""
    users: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight")
        if w is not None:
            users.setdefault(id(w), set()).add(name)
    return {n: names for names in users.values() if len(names) > 1 for n in names}


@torch.no_grad()
def apply_starts(model: nn.Module, name: str, starts: dict[str, Start]) -> None:
    """Set adapter `name` of each wrapped layer to its Start, and remember residual starts
    (LoRALinear.starts) so the adapter can be exported against the original base."""
    layers = {n: l for n, l in lora_layers(model).items() if name in l.adapters}
    for module, start in starts.items():
        layer = layers.get(module)
        if layer is None:
            raise LorqError(f"{module} has an initialization but no adapter {name!r}")
        ad = layer.adapters[name]
        ad.set_init(start.B, start.A, start.R)
        ad.after_init(layer)
        if start.residual:
            layer.starts[name] = start


class LowRankUse(str, Enum):
    """What the low-rank factors of a compensated quantization become."""

    INIT = "init"  # the trainable LoRA's initial value
    COMPENSATE = "compensate"  # a frozen branch of the base (the model is Q + L1 L2)


def pop_compensation(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Detach every QuantizedLinear's frozen factors: name -> (L1 (out, r), L2 (r, in))."""
    factors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear) and mod.rank:
            factors[name] = (mod.lowrank_b, mod.lowrank_a)
            mod.set_lowrank(None)
    return factors


@torch.no_grad()
def init_from_factors(model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set adapter `name` of each wrapped layer to its factors: scaling · B A = L1 L2."""
    layers = {n: l for n, l in lora_layers(model).items() if name in l.adapters}
    for module, (l1, l2) in factors.items():
        layer = layers.get(module)
        if layer is None:
            raise LorqError(f"{module} has low-rank factors but no adapter {name!r} (adapt every compensated layer)")
        ad = layer.adapters[name]
        if ad.rank != l1.shape[1]:
            raise LorqError(f"{module}: factors of rank {l1.shape[1]} cannot initialize a rank-{ad.rank} adapter (use the same --rank)")
        ad.set_init(l1 / ad.scaling, l2)
        ad.after_init(layer)
