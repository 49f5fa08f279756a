"""Hook points read module paths from the one architecture table, :mod:`workbench.arch` (re-exported here).

A hook point is read or replaced through ordinary torch hooks on the existing modules, so the model is
never rewritten. Names follow TransformerLens (``blocks.{i}.hook_resid_pre`` ...) so analysis code moves
between the two.
"""

from workbench.arch import ARCHITECTURES, ArchSpec, arch_of, get_module, layers_of

__all__ = ["ARCHITECTURES", "ArchSpec", "arch_of", "get_module", "layers_of"]
