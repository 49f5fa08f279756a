"""Registry of generation strategies ("generation schedulers"), keyed by exact names.

A strategy is an object with ``config_type`` (its dataclass config) and ``generate(engine, prompts, config)``.
Register more with :func:`register_strategy` (speculative decoding and MCTS plug in here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from workbench.engine.config import BeamConfig, GenerationConfig
from workbench.errors import UnknownNameError


class Strategy(Protocol):
    config_type: type

    def generate(self, engine, prompts, config) -> list: ...


@dataclass(frozen=True)
class SampleStrategy:
    """Greedy / sampled decoding with per-request processors, stop conditions and constraints."""

    config_type: type = GenerationConfig

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
        from workbench.engine.beam import beam_search

        return beam_search(engine, prompts, BeamConfig() if config is None else config)


@dataclass(frozen=True)
class SpeculativeStrategy:
    """Speculative decoding (exact); ``draft``: an Engine or (model, tokenizer) for proposer 'draft-model'."""

    draft: Any = None

    @property
    def config_type(self):
        from workbench.engine.speculative import SpeculativeConfig

        return SpeculativeConfig

    def generate(self, engine, prompts, config):
        from workbench.engine.speculative import SpeculativeConfig, speculative_generate

        return speculative_generate(engine, prompts, SpeculativeConfig() if config is None else config,
                                    draft=self.draft)


@dataclass(frozen=True)
class MCTSStrategy:
    """Monte Carlo tree search over tokens with the reward in its MCTSConfig."""

    @property
    def config_type(self):
        from workbench.engine.mcts import MCTSConfig

        return MCTSConfig

    def generate(self, engine, prompts, config):
        from workbench.engine.mcts import mcts_generate

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
    STRATEGIES[name] = strategy


def get_strategy(name: str):
    if name not in STRATEGIES:
        raise UnknownNameError("generation strategy", name, list(STRATEGIES))
    return STRATEGIES[name]
