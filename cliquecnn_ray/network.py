"""The CNN (paper Sect. 2.4, 3.1; docs/method.md#the-loss): the network, its K-way head, starting from another
round's weights. Feature extraction is ``cnn_features``, model files are ``model_file``.

Pure torch; no Ray. Networks take float images (N, C, H, W) with values in [0, 1]: the input
standardisation is the first layer of every network, so training and feature extraction cannot disagree
about it and a saved model carries it.
"""
from __future__ import annotations

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


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear of the network, in order."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, nn.Linear)]


def head_name(model: nn.Module) -> str:
    """Module name of the K-way head: the last nn.Linear (its weight is (K, d))."""
    linears = linear_layers(model)
    if not linears:
        raise ValueError("model has no nn.Linear head")
    return linears[-1][0]


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
