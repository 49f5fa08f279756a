"""Hallucination detection for short-answer generation: token log-probability and entropy, semantic entropy
(with pluggable entailment judges), P(True), linear probes on hidden states; AUROC / AURAC with bootstrap
intervals; a closed-book QA format with its correctness rule. See ``docs/hallucination.md``.

    from workbench.hallucination import generate_answers, make_detector
    gens = generate_answers(engine, ["What is the capital of France?"])
    make_detector("token-entropy").score(gens)
"""

from workbench.hallucination.detectors import (
    DETECTORS,
    TokenEntropy,
    TokenLogprob,
    detector_names,
    make_detector,
    register_detector,
    token_entropy_stats,
    token_logprob_score,
)
from workbench.hallucination.generation import (
    AnswerConfig,
    Generation,
    Sample,
    answer_prompt,
    generate_answers,
    sample_answers,
)
from workbench.hallucination.metrics import (
    Interval,
    aurac,
    aurac_oracle,
    auroc,
    bootstrap_ci,
    bootstrap_diff,
    rejection_accuracy_curve,
    roc_curve,
)
from workbench.hallucination.probe import (
    LinearProbe,
    ProbeConfig,
    binarize_entropy,
    cross_validated_scores,
    train_probe,
)
from workbench.hallucination.ptrue import PTrueConfig, p_true, ptrue_prompt
from workbench.hallucination.qa import QAItem, is_correct, is_correct_prefix, load_qa, normalize_answer
from workbench.hallucination.semantic import (
    JUDGES,
    ExactMatchJudge,
    LMJudge,
    NLIJudge,
    SemanticEntropyConfig,
    analyse_samples,
    cluster_answers,
    discrete_semantic_entropy,
    make_judge,
    semantic_entropy,
)

__all__ = [
    "DETECTORS", "JUDGES", "AnswerConfig", "ExactMatchJudge", "Generation", "Interval", "LMJudge", "LinearProbe",
    "NLIJudge", "PTrueConfig", "ProbeConfig", "QAItem", "Sample", "SemanticEntropyConfig", "TokenEntropy",
    "TokenLogprob", "analyse_samples", "answer_prompt", "aurac", "aurac_oracle", "auroc", "binarize_entropy",
    "bootstrap_ci", "bootstrap_diff", "cluster_answers", "cross_validated_scores", "detector_names",
    "discrete_semantic_entropy", "generate_answers", "is_correct", "is_correct_prefix", "load_qa", "make_detector",
    "make_judge", "normalize_answer", "p_true", "ptrue_prompt", "register_detector", "rejection_accuracy_curve",
    "roc_curve", "sample_answers", "semantic_entropy", "token_entropy_stats", "token_logprob_score",
    "train_probe",
]
