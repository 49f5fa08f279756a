"""The generation engine: a static-KV-cache decode loop with pluggable generation strategies.

>>> from workbench.engine import Engine, GenerationConfig, BeamConfig, Regex   # doctest: +SKIP
>>> engine = Engine(model, tokenizer)
>>> [res] = engine.generate(["What is the capital of France?"], GenerationConfig(max_new_tokens=32))
>>> [beam] = engine.generate(["The sea is"], BeamConfig(num_beams=4), strategy="beam")
>>> [num] = engine.generate(["A number:"], GenerationConfig(constraint=Regex(r"[0-9]{3}")))
>>> with engine.intervene(offsets={"blocks.10.hook_resid_post": vector}):   # a control vector
...     [steered] = engine.generate(["Tell me a story"])
"""

from workbench.engine.beam import BeamStats, Hypothesis
from workbench.engine.config import BeamConfig, GenerationConfig, SamplingParams
from workbench.engine.constrained import ConstraintError, JsonSchema, Regex
from workbench.engine.engine import Engine
from workbench.engine.interventions import Interventions
from workbench.engine.mcts import MCTSConfig, MCTSStats
from workbench.engine.results import GenerationResult, TokenEvent, TokenLogprob
from workbench.engine.speculative import SpeculativeConfig, SpeculativeStats, register_draft
from workbench.engine.step import Session
from workbench.engine.strategies import STRATEGIES, get_strategy, register_strategy

__all__ = ["STRATEGIES", "BeamConfig", "BeamStats", "ConstraintError", "Engine", "GenerationConfig",
           "GenerationResult", "Hypothesis", "Interventions", "JsonSchema", "MCTSConfig", "MCTSStats", "Regex",
           "SamplingParams", "Session", "SpeculativeConfig", "SpeculativeStats", "TokenEvent", "TokenLogprob",
           "get_strategy", "register_draft", "register_strategy"]
