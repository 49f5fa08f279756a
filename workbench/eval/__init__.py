"""Evaluation: perplexity (and, later, long-context harnesses)."""
