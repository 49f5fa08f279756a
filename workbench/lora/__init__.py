"""LoRA orchestration: many PEFT adapters on one base model, chosen per request, never merged.

- :func:`load_adapter` reads a PEFT LoRA folder into plain tensors (:class:`LoraAdapter`), refusing what it
  cannot run exactly;
- :class:`AdapterRegistry` keeps named adapters, a bounded LRU of them resident in stacked pools;
- the engine adds each row's adapter terms (``Engine(..., adapters=registry)``, then
  ``engine.intervene(adapters=[...])``; see :mod:`workbench.engine.interventions`).
"""

from workbench.lora.adapter import AdapterError, LoraAdapter, LoraModule, load_adapter
from workbench.lora.registry import AdapterBusyError, AdapterRegistry, Lease

__all__ = ["AdapterBusyError", "AdapterError", "AdapterRegistry", "Lease", "LoraAdapter", "LoraModule",
           "load_adapter"]
