"""The generation engine: a static-KV-cache decode loop with pluggable generation strategies.

>>> from workbench.engine import Engine, GenerationConfig, BeamConfig, Regex   # doctest: +SKIP
>>> engine = Engine(model, tokenizer)
>>> [res] = engine.generate(["What is the capital of France?"], GenerationConfig(max_new_tokens=32))
>>> [beam] = engine.generate(["The sea is"], BeamConfig(num_beams=4), strategy="beam")
>>> [num] = engine.generate(["A number:"], GenerationConfig(constraint=Regex(r"[0-9]{3}")))
"""

from workbench.engine.beam import BeamResult, Hypothesis
from workbench.engine.config import BeamConfig, GenerationConfig, SamplingParams
from workbench.engine.constrained import ConstraintError, JsonSchema, Regex
from workbench.engine.engine import Engine, GenerationResult, TokenEvent
from workbench.engine.strategies import STRATEGIES, get_strategy, register_strategy

__all__ = ["STRATEGIES", "BeamConfig", "BeamResult", "ConstraintError", "Engine", "GenerationConfig",
           "GenerationResult", "Hypothesis", "JsonSchema", "Regex", "SamplingParams", "TokenEvent",
           "get_strategy", "register_strategy"]
