"""Layer-by-layer calibration for GPTQ: decoder layers in order, one layer's activations at once.

The inputs of the first decoder layer are captured once (a pre-hook stops the forward there);
then for each layer: hooks accumulate each target linear's Hessian while the layer runs on
the calibration batches, its linears are quantized, and the layer runs again, now quantized,
to produce the next layer's inputs (as in GPTQ, later layers see earlier layers' errors).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import LorqError
from .gptq import GramCache, HessianAccumulator
from .linear import DECODER_BLOCKS
from .quantize import MethodConfig, QuantMethod, QuantReport, Rule, needs_calibration, quantize_linear

CALIB_BATCH = 4


class _StopForward(Exception):
    pass


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and re.search(DECODER_BLOCKS + "$", name):
            return name, mod
    raise LorqError("calibrated quantization: no list of decoder layers found in this model")


@torch.no_grad()
def first_layer_inputs(model: nn.Module, layer: nn.Module, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of layer's forward for each calibration batch."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(ids), CALIB_BATCH):
            try:
                model(input_ids=ids[i:i + CALIB_BATCH], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The layer's outputs, packaged as the next layer's inputs."""
    outs = []
    for args, kwargs in inputs:
        y = layer(*args, **kwargs)
        outs.append(with_hidden(args, kwargs, y[0] if isinstance(y, tuple) else y))
    return outs


def quantize_sequential(model: nn.Module, plan: dict[str, tuple[nn.Linear, Rule]], mcfg: MethodConfig,
                        calibration: torch.Tensor, report: QuantReport, progress: bool = True, fisher: dict | None = None) -> None:
    list_name, layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    inputs = first_layer_inputs(model, layers[0], calibration)
    done = set()
    for idx, layer in enumerate(tqdm(layers, desc="quantize (calibrated)", unit="layer", disable=not progress)):
        prefix = f"{list_name}.{idx}." if list_name else f"{idx}."
        targets = {n: v for n, v in plan.items() if n.startswith(prefix)}
        accs = {n: HessianAccumulator() for n, (mod, rule) in targets.items() if needs_calibration(rule)}
        gram = GramCache()
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, acc=acc: acc.add(a[0], gram)) for n, acc in accs.items()]
        try:
            if accs:
                run_layer(layer, inputs)
        finally:
            for h in hooks:
                h.remove()
        for n, (mod, rule) in targets.items():
            if n in accs and accs[n].n == 0:  # never ran on the calibration data (e.g. an unrouted expert)
                tqdm.write(f"lorq: note: {n} saw no calibration tokens; quantized with rtn (and lorc for eora) instead")
                rule = Rule(rule.pattern, rule.quant, QuantMethod.RTN, "lorc" if rule.compensated else "none", rule.rank)
            hessian = accs[n].hessian() if n in accs and accs[n].n else None
            quantize_linear(model, n, mod, rule, mcfg, report, hessian, (fisher or {}).get(n))
            done.add(n)
        if idx + 1 < len(layers):
            inputs = run_layer(layer, inputs)
    for n, (mod, rule) in plan.items():  # layers outside the decoder blocks (rtn/hqq rules, e.g. lm_head)
        if n not in done:
            quantize_linear(model, n, mod, rule, mcfg, report, fisher=(fisher or {}).get(n))
    model.train(was_training)
