"""SAELens-format files: ``cfg.json`` + ``sae_weights.safetensors`` (W_enc, b_enc, W_dec, b_dec[, threshold]).

Mapping of architectures (ours -> SAELens ``architecture``): relu -> standard, topk -> topk,
jumprelu -> jumprelu, batchtopk -> jumprelu with the learned global threshold (as SAELens saves batch-top-k).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workbench.sae.model import SAEConfig, SparseAutoencoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def save_sae(sae: SparseAutoencoder, folder: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``sae`` in SAELens' format (loadable with ``sae_lens.SAE.load_from_disk``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    weights = {name: getattr(sae, name).detach().contiguous().cpu() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    thr = sae.thresholds()
    if thr is not None:
        weights["threshold"] = thr.detach().contiguous().cpu()
    out = {
        "architecture": TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",  # any training-time scaling is folded into the weights
        "reshape_activations": "none",
        "metadata": {"hook_name": cfg.hook_name, "model_name": cfg.model_name, "daert_architecture": cfg.architecture,
                     **(metadata or {})},
    }
    if cfg.architecture == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    save_file(weights, str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(out, indent=2) + "\n")
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE saved by :func:`save_sae` or by SAELens (standard, topk, jumprelu architectures)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an SAELens-format folder: {name} is missing")
    raw = json.loads((folder / CFG_FILE).read_text())
    arch = raw.get("architecture", "standard")
    if arch not in FROM_SAELENS:
        raise ValueError(f"SAELens architecture {arch!r} is not supported here; supported: {sorted(FROM_SAELENS)}")
    for key, ok in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if raw.get(key, "none") != ok:
            raise ValueError(f"{key}={raw[key]!r} is not supported (only 'none'); fold the scaling into the weights")
    if raw.get("rescale_acts_by_decoder_norm"):
        raise ValueError("rescale_acts_by_decoder_norm=True is not supported")
    meta = raw.get("metadata") or {}
    ours = FROM_SAELENS[arch]
    weights = load_file(str(folder / WEIGHTS_FILE))
    cfg = SAEConfig(
        d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), architecture=ours, k=int(raw.get("k", 1) or 1),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        hook_name=meta.get("hook_name") or raw.get("hook_name") or "",
        model_name=meta.get("model_name") or raw.get("model_name") or "",
    )
    sae = SparseAutoencoder(cfg, seed=None)
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if ours == "jumprelu":
        expected["threshold"] = (cfg.d_sae,)
    with torch.no_grad():
        for name, shape in expected.items():
            if name not in weights:
                raise KeyError(f"{folder / WEIGHTS_FILE} has no {name!r}")
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(weights[name].shape)}, expected {shape} from cfg.json")
            if name == "threshold":
                sae.log_threshold.copy_(weights[name].float().clamp(min=1e-30).log())
            else:
                getattr(sae, name).copy_(weights[name].float())
    return sae.to(device)
