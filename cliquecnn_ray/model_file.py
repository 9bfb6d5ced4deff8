"""Model files: a network's state_dict plus what it takes to rebuild it (``model.pt`` of a train stage).

Pure torch; no Ray.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from .config import PipelineConfig
from .network import build_model, unwrap

MODEL_FILE = "model.pt"  # the file a model stage commits
MODEL_KEYS = ("name", "num_classes", "input_size", "in_channels")


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


def model_meta(cfg: PipelineConfig, num_classes: int, clique_ids: np.ndarray) -> dict:
    """What it takes to rebuild the network (model.pt's "model" entry)."""
    return {
        "name": cfg.train.model,
        "num_classes": int(num_classes),
        "input_size": cfg.train.input_size,
        "in_channels": 1 if cfg.train.grey else 3,
        "clique_ids": [int(c) for c in clique_ids],
    }
