"""Shipped weights: ``models/weights/<name>.safetensors`` + ``<name>.json`` (architecture, config, sha256).

``load_shipped(name) -> (model, meta)`` verifies the file's sha256 against the sidecar before loading and
raises :class:`WeightsIntegrityError` on a mismatch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .factory import build_model

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class WeightsIntegrityError(RuntimeError):
    pass


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def available(weights_dir=None) -> list[str]:
    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    return sorted(p.stem for p in d.glob("*.json") if (d / f"{p.stem}.safetensors").exists())


def read_meta(name: str, weights_dir=None) -> dict:
    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    p = d / f"{name}.json"
    if not p.exists():
        raise FileNotFoundError(f"no shipped weights named {name!r} in {d} (available: {available(d)})")
    return json.loads(p.read_text())


def load_shipped(name: str, weights_dir=None, device="cpu", dtype=torch.float32):
    """Build the architecture named in the sidecar, verify the sha256, load the weights; eval mode."""
    from safetensors.torch import load_file

    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    meta = read_meta(name, d)
    st = d / meta.get("file", f"{name}.safetensors")
    if not st.exists():
        raise FileNotFoundError(f"weights file {st} missing")
    got = sha256_file(st)
    if got != meta["sha256"]:
        raise WeightsIntegrityError(
            f"sha256 mismatch for {st}: sidecar says {meta['sha256']}, file is {got}. The weights file is "
            "corrupt or was replaced; re-export it (python -m training export) or restore it from the repository.")
    model = build_model(meta["arch"], meta.get("model_config") or {})
    sd = load_file(str(st))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.startswith("inp_")]  # inpainting heads are not shipped
    if missing or unexpected:
        raise WeightsIntegrityError(f"{st} does not match architecture {meta['arch']}: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")
    if hasattr(model, "set_mode"):
        model.set_mode("segment")
    model = model.to(device=device, dtype=dtype).eval()
    return model, meta
