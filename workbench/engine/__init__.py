"""The generation engine: a static-KV-cache decode loop with pluggable generation schedulers.

>>> from workbench.engine import Engine, GenerationConfig, SamplingParams   # doctest: +SKIP
>>> engine = Engine(model, tokenizer)
>>> [res] = engine.generate(["What is the capital of France?"], GenerationConfig(max_new_tokens=32))
"""

from workbench.engine.config import GenerationConfig, SamplingParams
from workbench.engine.engine import Engine, GenerationResult, TokenEvent

__all__ = ["Engine", "GenerationConfig", "GenerationResult", "SamplingParams", "TokenEvent"]
