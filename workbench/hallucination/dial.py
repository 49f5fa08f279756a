"""A dial from factual to imaginative generation, and the factual model's view of what comes out.

One number ``level`` in [0, 1] sets two knobs together:

- **sampling temperature** ``level * max_temperature`` (0: greedy decoding);
- a **"creative" control vector** at strength ``level * max_strength``, added to every layer's residual
  stream through the engine (:func:`workbench.surgery.steer.steer`). It is trained with ``pca_diff`` on contrast
  pairs of an inventive storyteller against a careful encyclopedia (:func:`creative_entries`), the persona
  recipe of repeng and representation engineering (Zou et al. 2023).

Level 0 is plain greedy decoding of the unmodified model. The dial is measured with the detectors' quantities,
computed by the *unsteered* model on the produced text (:func:`factual_scores`): the mean negative
log-probability of the answer tokens (``token-logprob``) and the mean entropy of the next-token distributions
along them (``token-entropy``). Both read "how far from what the factual model would say"; the experiment
``experiments/hallucination_dial.py`` checks that they rise with the level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workbench.engine.config import GenerationConfig, SamplingParams

CREATIVE = ("a wildly imaginative storyteller who invents facts, names and places freely",
            "a dreamer who makes up fantastic answers")
FACTUAL = ("a careful encyclopedia that states only verified facts",
           "a precise scholar who answers only with what is known to be true")
SUFFIXES = ("The capital of the country is", "The inventor of the telephone was", "The tallest mountain is",
            "The book was written by", "The river flows through", "The element's symbol is",
            "The war ended in the year", "The planet closest to the sun is", "The painter of the portrait was",
            "The largest animal is", "The first person on the moon was", "The speed of light is")


def creative_entries(tokenizer=None) -> list:
    """Contrast pairs (positive: imaginative, negative: factual), one per persona pair and suffix."""
    from workbench.surgery import DatasetEntry

    return [DatasetEntry(f"Act as {c}. {s}", f"Act as {f}. {s}")
            for c, f in zip(CREATIVE, FACTUAL, strict=True) for s in SUFFIXES]


def train_creative_vector(model, tok, progress: bool = False):
    """The dial's control vector for ``model`` (``pca_diff``, every layer but 0)."""
    from workbench.surgery import ControlVector

    return ControlVector.train(model, tok, creative_entries(), method="pca_diff", progress=progress)


@dataclass(frozen=True)
class DialConfig:
    """``max_temperature`` and ``max_strength`` are the knobs' values at level 1; ``top_p`` applies whenever the
    temperature is above 0."""
    max_temperature: float = 1.2
    max_strength: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_temperature < 0 or self.max_strength < 0:
            raise ValueError("max_temperature and max_strength must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Dial:
    """Generate at a level of the factual-to-imaginative dial (see the module docstring)::

        dial = Dial(engine)                       # trains the creative vector (seconds on SmolLM2)
        dial.generate(["Who painted the Mona Lisa?"], level=0.8, max_new_tokens=24, seed=0)
    """

    def __init__(self, engine, vector=None, config: DialConfig = DialConfig()):
        self.engine = engine
        self.config = config
        self.vector = vector if vector is not None else train_creative_vector(engine.model, engine.tokenizer)

    def settings(self, level: float) -> tuple[SamplingParams, float]:
        """The sampling parameters and the control-vector strength at ``level``."""
        if not 0.0 <= float(level) <= 1.0:
            raise ValueError(f"the dial level must be in [0, 1], got {level}")
        t = float(level) * self.config.max_temperature
        sampling = SamplingParams(temperature=t, top_p=self.config.top_p if t > 0 else 1.0)
        return sampling, float(level) * self.config.max_strength

    def generate(self, prompts, level: float, *, max_new_tokens: int = 32, seed: int | None = 0,
                 stop_strings: Sequence[str] = ()):
        """One :class:`~workbench.engine.GenerationResult` per prompt (strings or token ids) at ``level``."""
        from workbench.surgery.steer import steer

        sampling, strength = self.settings(level)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                               stop_strings=tuple(stop_strings))
        if strength == 0:
            return self.engine.generate(prompts, cfg)
        with steer(self.engine, self.vector, strength):
            return self.engine.generate(prompts, cfg)


@torch.inference_mode()
def factual_scores(engine, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]]
                   ) -> list[dict[str, float]]:
    """For each (prompt, answer): the unsteered model's mean negative log-probability of the answer tokens
    (``token-logprob``) and mean entropy of its next-token distributions along them (``token-entropy``), teacher
    forced. Run outside any steering block (the engine's interventions in force would apply)."""
    out = []
    for p, a in zip(prompt_ids, answer_ids, strict=True):
        if not a:
            out.append({"token-logprob": float("nan"), "token-entropy": float("nan")})
            continue
        lp = torch.log_softmax(engine.teacher_forced(p, a).float(), -1)
        nll = -lp.gather(1, torch.tensor(a, device=lp.device)[:, None]).mean().item()
        ent = -(lp.exp() * lp).sum(-1).mean().item()
        out.append({"token-logprob": nll, "token-entropy": ent})
    return out
