"""Registry of generation strategies ("generation schedulers"), keyed by exact names.

A strategy is an object with ``config_type`` (its dataclass config, checked by ``Engine.generate``) and
``generate(engine, prompts, config) -> list[GenerationResult]``. Strategies drive the model only through the
step API (:meth:`Engine.start <workbench.engine.Engine.start>` and :class:`workbench.engine.step.Session`).
Register more with :func:`register_strategy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from workbench.engine.beam import beam_search
from workbench.engine.config import BeamConfig, GenerationConfig
from workbench.engine.mcts import MCTSConfig, mcts_generate
from workbench.engine.speculative import SpeculativeConfig, speculative_generate
from workbench.errors import UnknownNameError


class Strategy(Protocol):
    config_type: type

    def generate(self, engine, prompts, config) -> list: ...


@dataclass(frozen=True)
class SampleStrategy:
    """Greedy / sampled decoding with per-request processors, stop conditions and constraints."""

    config_type: type = GenerationConfig
    per_prompt_configs: bool = True  # a list with one config per prompt is accepted

    def generate(self, engine, prompts, config):
        if config is None:
            config = GenerationConfig()
        cfgs = [config] if isinstance(config, GenerationConfig) else config
        if not isinstance(cfgs, Sequence) or not all(isinstance(c, GenerationConfig) for c in cfgs):
            raise TypeError(f"strategy 'sample' takes a GenerationConfig (or one per prompt), got {config!r}")
        return engine.sample(prompts, config)


@dataclass(frozen=True)
class BeamStrategy:
    """Beam search (HF-equivalent scoring, length penalty, early stopping)."""

    config_type: type = BeamConfig

    def generate(self, engine, prompts, config):
        return beam_search(engine, prompts, BeamConfig() if config is None else config)


@dataclass(frozen=True)
class SpeculativeStrategy:
    """Speculative decoding (exact); the draft model, if any, comes in the config (an engine, a
    ``(model, tokenizer)`` pair or a name given to :func:`workbench.engine.speculative.register_draft`)."""

    config_type: type = SpeculativeConfig

    def generate(self, engine, prompts, config):
        return speculative_generate(engine, prompts, SpeculativeConfig() if config is None else config)


@dataclass(frozen=True)
class MCTSStrategy:
    """Monte Carlo tree search over tokens with the reward in its MCTSConfig."""

    config_type: type = MCTSConfig

    def generate(self, engine, prompts, config):
        if config is None:
            raise ValueError("strategy 'mcts' needs an MCTSConfig with a reward")
        return mcts_generate(engine, prompts, config)


STRATEGIES: dict[str, Any] = {"sample": SampleStrategy(), "beam": BeamStrategy(),
                              "speculative": SpeculativeStrategy(), "mcts": MCTSStrategy()}


def register_strategy(name: str, strategy: Any, *, replace: bool = False) -> None:
    if not name or not isinstance(name, str):
        raise ValueError("strategy name must be a non-empty string")
    if name in STRATEGIES and not replace:
        raise ValueError(f"strategy {name!r} is already registered (pass replace=True to override)")
    if not callable(getattr(strategy, "generate", None)):
        raise TypeError("a strategy needs a generate(engine, prompts, config) method")
    if not isinstance(getattr(strategy, "config_type", None), type):
        raise TypeError("a strategy needs a config_type (the dataclass its generate takes)")
    STRATEGIES[name] = strategy


def get_strategy(name: str):
    if name not in STRATEGIES:
        raise UnknownNameError("generation strategy", name, list(STRATEGIES))
    return STRATEGIES[name]
