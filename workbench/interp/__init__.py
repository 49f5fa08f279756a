"""Interpretability: named hook points on HF models, activation cache, logit lens, (attribution) patching,
and a TransformerLens bridge. Sparse autoencoders live in :mod:`workbench.sae`."""

from workbench.interp.arch import ARCHITECTURES, ArchSpec
from workbench.interp.bridge import to_transformer_lens
from workbench.interp.cache import ActivationCache, run_with_cache
from workbench.interp.hooks import HookPoint, Hooks, count_hooks, hook_names, hook_point, run_with_hooks
from workbench.interp.lens import LogitLensResult, logit_lens, unembed
from workbench.interp.patching import (
    PatchingResult,
    activation_patching,
    attribution_patching,
    logit_diff,
)

__all__ = [
    "ARCHITECTURES", "ArchSpec", "ActivationCache", "HookPoint", "Hooks", "LogitLensResult", "PatchingResult",
    "activation_patching", "attribution_patching", "count_hooks", "hook_names", "hook_point", "logit_diff",
    "logit_lens", "run_with_cache", "run_with_hooks", "to_transformer_lens", "unembed",
]
