"""Context extension without retraining: RoPE scaling (linear, NTK, dynamic NTK, YaRN, Llama 3), attention
sinks, and (in :mod:`workbench.eval.long_context`) perplexity-vs-length and passkey evaluation."""

from workbench.context.rope_scaling import (
           METHODS,
           RopeScaling,
           RopeScalingHandle,
           apply_rope_scaling,
           inv_freq_for,
)
from workbench.context.sinks import SinkConfig, StreamingLM

__all__ = ["METHODS", "RopeScaling", "RopeScalingHandle", "SinkConfig", "StreamingLM", "apply_rope_scaling",
           "inv_freq_for"]
