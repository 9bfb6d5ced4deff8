"""Features of images at a layer of the CNN (paper Sect. 2.5, 3.1): the input tensor, the layer, the pass.

Pure torch; no Ray. Pearson normalisation of the result is ``similarity.pearson_normalise``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .network import linear_layers, unwrap

FEATURE_LAYERS = {"fc7": 1, "fc6": 2, "pool5": 3}  # layer → which Linear from the end takes it as input


def _feature_module(model: nn.Module, layer: str) -> tuple[nn.Module, bool]:
    """(module, take_input): fc7 = the input of the last Linear (the head), fc6 = the input of the one
    before, pool5 = the input of fc6 (the flattened last pooled convolution map, as AlexNet's pool5);
    any other name is a module whose output is taken."""
    net = unwrap(model)
    if layer in FEATURE_LAYERS:
        linears = linear_layers(net)
        k = FEATURE_LAYERS[layer]
        if len(linears) < k:
            raise ValueError(f"feature layer '{layer}': the model has only {len(linears)} linear layer(s)")
        return linears[-k][1], True
    modules = dict(net.named_modules())
    if layer not in modules:
        raise ValueError(f"feature layer '{layer}' is not pool5, fc6, fc7 or a module of the model")
    return modules[layer], False


def to_input(images, in_channels: Optional[int] = None) -> torch.Tensor:
    """uint8 images (N, H, W) grey or (N, H, W, 3) RGB (``hog.decode_images``' layout) → float
    (N, C, H, W) in [0, 1]. A float tensor (N, C, H, W) is returned as is."""
    x = torch.as_tensor(images)
    if x.is_floating_point() and x.ndim == 4:
        return x
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"to_input: images must be (N, H, W) or (N, H, W, 3), got shape {tuple(x.shape)}")
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(f"to_input: images have {x.shape[1]} channel(s), the model takes {in_channels}")
    return x.float().div_(255.0)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images,
    layer: str = "fc7",
    batch_size: int = 256,
    device: Optional[torch.device | str] = None,
    amp: bool = False,
) -> torch.Tensor:
    """Features of ``images`` at ``layer`` in eval mode (dropout off, BatchNorm running statistics).

    Args:
        model: a network from ``build_model`` (DDP-wrapped or not).
        images: uint8 (N, H, W) / (N, H, W, 3) array or tensor, or float (N, C, H, W) in [0, 1].
        layer: "fc7" (paper Sect. 3.1: the input of the head, i.e. the penultimate layer, after ReLU),
            "fc6" (the layer before), "pool5" (the input of fc6: the last convolution map, pooled and
            flattened), or the name of any module of the network (its output, flattened).
        amp: bf16 autocast (on GPU).

    Returns:
        (N, d) float32 CPU tensor.
    """
    net = unwrap(model)
    module, take_input = _feature_module(net, layer)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    x_all = to_input(images)
    captured: list[torch.Tensor] = []

    def hook(_mod, inputs, output):
        captured.append((inputs[0] if take_input else output).flatten(1))

    handle = module.register_forward_hook(hook)
    was_training = net.training
    net.eval()
    out = []
    try:
        for start in range(0, len(x_all), batch_size):
            captured.clear()
            x = x_all[start : start + batch_size].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                net(x)
            out.append(captured[0].float().cpu())
    finally:
        handle.remove()
        net.train(was_training)
    if not out:
        return torch.zeros((0, 0))
    return torch.cat(out)


def frame_features(model: nn.Module, images, layer: str, batch_size: int = 256,
                   device: Optional[torch.device | str] = None):
    """A trained model's per-frame features φ (paper Sect. 2.5): layer ``layer``'s output, Pearson-normalised.

    The impute stage, ``cliquecnn embed`` and the search service's image queries all go through here, so a
    frame gets the same φ whichever path computed it. Returns (N, d) float32 numpy.
    """
    from .similarity import pearson_normalise

    device = torch.device(device) if device is not None else next(unwrap(model).parameters()).device
    feats = extract_features(model, images, layer, batch_size=batch_size, device=device,
                             amp=device.type == "cuda")
    return pearson_normalise(feats.numpy())
