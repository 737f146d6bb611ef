"""Row/column Fisher weights for LQ-LoRA's weighted SVD (Guo et al., 2024, §3.3).

The empirical Fisher of weight W_ij is approximated by the squared gradient of the LM loss on
calibration batches, F_ij = Σ_b g_ij². LQ-LoRA uses its rank-1 fit F ≈ a bᵀ (exact row and
column sums: a_i b_j = rowsum_i · colsum_j / total), so √F_ij = d_r[i] · d_c[j] and
‖√F ⊙ E‖ = ‖diag(d_r) E diag(d_c)‖ is solved by an SVD of the scaled matrix.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from tqdm.auto import tqdm


def rank1_sqrt(rowsum: torch.Tensor, colsum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_r, d_c) with d_r[i]·d_c[j] = √(rowsum_i · colsum_j / total); zero rows/columns get a
    small floor so the weighted SVD can be undone."""
    total = rowsum.sum().clamp_min(1e-30)
    d_r = (rowsum / total.sqrt()).sqrt()
    d_c = (colsum / total.sqrt()).sqrt()
    return d_r.clamp_min(1e-3 * d_r.mean() + 1e-30), d_c.clamp_min(1e-3 * d_c.mean() + 1e-30)


def fisher_weights(model: nn.Module, names: list[str], calibration: torch.Tensor, progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (d_r (out,), d_c (in,)) for each nn.Linear `name`, from the LM loss on calibration."""
    from .calibration import CALIB_BATCH
    layers = {n: model.get_submodule(n) for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: gradients of the model as it will be used
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    rows = {n: torch.zeros(l.out_features, dtype=torch.float64) for n, l in layers.items()}
    cols = {n: torch.zeros(l.in_features, dtype=torch.float64) for n, l in layers.items()}
    try:
        for i in tqdm(range(0, len(calibration), CALIB_BATCH), desc="fisher", unit="batch", disable=not progress):
            ids = calibration[i:i + CALIB_BATCH].to(next(model.parameters()).device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for n, layer in layers.items():
                g2 = layer.weight.grad.double().pow(2)  # (out, in)
                rows[n] += g2.sum(1).cpu()
                cols[n] += g2.sum(0).cpu()
                layer.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return {n: tuple(t.float().to(layers[n].weight.device) for t in rank1_sqrt(rows[n], cols[n])) for n in names}
