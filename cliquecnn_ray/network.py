"""The CNN (paper Sect. 2.4, 3.1; docs/method.md#the-loss): network builder, feature extraction, model files.

Pure torch; no Ray. Networks take float images (N, C, H, W) with values in [0, 1]: the input
standardisation is the first layer of every network, so training and feature extraction cannot disagree
about it and a saved model carries it.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch
from torch import nn

FC_DIM = 512  # width of fc6 / fc7 in alexnet_small: 1/8 of AlexNet's 4096, sized for 28–64 px inputs
INPUT_MEAN, INPUT_STD = 0.5, 0.25  # fixed standardisation of [0, 1] pixels; BatchNorm does the rest


class Standardise(nn.Module):
    """(x − mean) / std with fixed constants: the network's first layer."""

    def __init__(self, mean: float = INPUT_MEAN, std: float = INPUT_STD):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class AlexNetSmall(nn.Module):
    """AlexNet's shape (5 convolutions, 3 max-pools, fc6, fc7, K-way head) scaled to 28–64 px inputs.

    conv5×5(32)-pool-conv3×3(64)-pool-conv3×3(128)-conv3×3(128)-conv3×3(128)-pool-avgpool(4×4)-
    fc6(512)-fc7(512)-head(K), BatchNorm after each convolution, dropout 0.5 before fc6 / fc7 / head as in
    AlexNet. About 0.1 GMAC per 64×64 image, so CPU training stays affordable. ``fc6``, ``fc7`` and
    ``head`` are the named nn.Linear layers; the features of a layer are its output after ReLU (Caffe's
    in-place ReLU makes its ``fc7`` blob post-ReLU too).
    """

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            Standardise(),
            *_conv(in_channels, 32, 5),
            nn.MaxPool2d(2),
            *_conv(32, 64, 3),
            nn.MaxPool2d(2),
            *_conv(64, 128, 3),
            *_conv(128, 128, 3),
            *_conv(128, 128, 3),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d((4, 4)),
            nn.Flatten(),
        )
        self.drop6, self.fc6 = nn.Dropout(0.5), nn.Linear(128 * 16, FC_DIM)
        self.drop7, self.fc7 = nn.Dropout(0.5), nn.Linear(FC_DIM, FC_DIM)
        self.drop8, self.head = nn.Dropout(0.5), nn.Linear(FC_DIM, num_classes)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc6(self.drop6(self.features(x))))
        x = self.relu(self.fc7(self.drop7(x)))
        return self.head(self.drop8(x))


class _GreyToRGB(nn.Module):
    """Wraps a 3-channel torchvision classifier for 1-channel input (repeat the channel)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def build_model(name: str, num_classes: int, input_size: int, in_channels: int = 1) -> nn.Module:
    """A K-way classifier for (N, in_channels, input_size, input_size) images in [0, 1].

    Args:
        name: "alexnet_small" (default network, trained from scratch) or any torchvision classification
            model name (``torchvision.models.get_model(name, weights=None, num_classes=K)``; no pretrained
            weights: none are downloadable here and the method learns from scratch).
        num_classes: K, the number of cliques (one output per clique).
        input_size: side of the square input in pixels.
        in_channels: 1 (grey) or 3 (RGB).

    Raises:
        ValueError naming the model and the input size when the network cannot take such inputs.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"build_model: in_channels must be 1 or 3, got {in_channels}")
    if num_classes < 1:
        raise ValueError(f"build_model: num_classes must be ≥ 1, got {num_classes}")
    if name == "alexnet_small":
        model: nn.Module = AlexNetSmall(num_classes, in_channels)
    else:
        import torchvision

        try:
            net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except ValueError as exc:
            raise ValueError(f"build_model: unknown model '{name}' (alexnet_small or a torchvision model)") from exc
        model = nn.Sequential(Standardise(), _GreyToRGB(net) if in_channels == 1 else net)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, input_size, input_size))
    except RuntimeError as exc:
        raise ValueError(f"build_model: model '{name}' cannot take {input_size}×{input_size} inputs: {exc}") from exc
    if out.shape != (2, num_classes):
        raise ValueError(f"build_model: model '{name}' gives outputs {tuple(out.shape)}, expected (2, {num_classes})")
    model.train()
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, nn.Linear)]


def head_name(model: nn.Module) -> str:
    """Module name of the K-way head: the last nn.Linear (its weight is (K, d))."""
    linears = _linears(model)
    if not linears:
        raise ValueError("model has no nn.Linear head")
    return linears[-1][0]


FEATURE_LAYERS = {"fc7": 1, "fc6": 2, "pool5": 3}  # layer → which Linear from the end takes it as input


def _feature_module(model: nn.Module, layer: str) -> tuple[nn.Module, bool]:
    """(module, take_input): fc7 = the input of the last Linear (the head), fc6 = the input of the one
    before, pool5 = the input of fc6 (the flattened last pooled convolution map, as AlexNet's pool5);
    any other name is a module whose output is taken."""
    net = unwrap(model)
    if layer in FEATURE_LAYERS:
        linears = _linears(net)
        k = FEATURE_LAYERS[layer]
        if len(linears) < k:
            raise ValueError(f"feature layer '{layer}': the model has only {len(linears)} linear layer(s)")
        return linears[-k][1], True
    modules = dict(net.named_modules())
    if layer not in modules:
        raise ValueError(f"feature layer '{layer}' is not pool5, fc6, fc7 or a module of the model")
    return modules[layer], False


def to_input(images, in_channels: Optional[int] = None) -> torch.Tensor:
    """uint8 images (N, H, W) grey or (N, H, W, 3) RGB (``features.decode_images``' layout) → float
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


def pearson_normalise(feats):
    """Centre each vector and L2-normalise it, so the inner product is Pearson correlation (paper Sect.
    2.4: "correlation on the learned feature representation").

    Args:
        feats: (N, d) numpy array or tensor.

    Returns:
        (N, d) float32 of the same kind; a constant vector (zero after centring) stays zero.
    """
    is_np = isinstance(feats, np.ndarray)
    x = torch.as_tensor(feats, dtype=torch.float32)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x.numpy() if is_np else x


def frame_features(model: nn.Module, meta: dict, images, batch_size: int = 256,
                   device: Optional[torch.device | str] = None) -> np.ndarray:
    """A trained model's per-frame features φ (paper Sect. 2.5): ``meta["feature_layer"]``, Pearson-normalised.

    The impute stage, ``cliquecnn embed`` and the search service's image queries all go through here, so a
    frame gets the same φ whichever path computed it. Returns (N, d) float32 numpy.
    """
    device = torch.device(device) if device is not None else next(unwrap(model).parameters()).device
    feats = extract_features(model, images, meta["feature_layer"], batch_size=batch_size, device=device,
                             amp=device.type == "cuda")
    return pearson_normalise(feats).numpy()


# ---------------------------------------------------------------------------------------------
# Model files: the state_dict plus what it takes to rebuild the network


MODEL_KEYS = ("name", "num_classes", "input_size", "in_channels", "feature_layer")


def save_model_bytes(model: nn.Module, meta: dict) -> bytes:
    """Serialise ``{"state_dict", "model": meta}``; meta holds MODEL_KEYS (and may hold more, e.g. the
    clique id of each head output)."""
    missing = [k for k in MODEL_KEYS if k not in meta]
    if missing:
        raise ValueError(f"save_model_bytes: model config lacks {missing}")
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    torch.save({"state_dict": state, "model": dict(meta)}, buf)
    return buf.getvalue()


def load_model_bytes(data: bytes, source: str = "") -> tuple[nn.Module, dict]:
    """Inverse of ``save_model_bytes``: (network in eval mode, meta)."""
    where = f" ({source})" if source else ""
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        raise ValueError(f"model file{where} cannot be read: {exc}") from exc
    meta = blob.get("model", {})
    missing = [k for k in MODEL_KEYS if k not in meta]
    if missing:
        raise ValueError(f"model file{where}: model config lacks {missing}")
    model = build_model(meta["name"], meta["num_classes"], meta["input_size"], meta["in_channels"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, meta


def load_backbone(model: nn.Module, state_dict: dict) -> dict:
    """Start ``model`` from another round's weights (paper Sect. 2.6): copy every tensor except the K-way
    head's. The head is re-initialised even when K is unchanged: output k of round r named a clique
    of round r's grouping, which has nothing to do with clique k of the next round.

    Returns:
        {"loaded": n tensors copied, "skipped": names left at their initialisation}.
    """
    net = unwrap(model)
    head = head_name(net) + "."
    own = net.state_dict()
    loaded, skipped = {}, []
    for key, value in state_dict.items():
        if key.startswith(head) or key not in own or own[key].shape != value.shape:
            skipped.append(key)
        else:
            loaded[key] = value
    skipped += [k for k in own if k not in state_dict]
    net.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "skipped": sorted(set(skipped))}
