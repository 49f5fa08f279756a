"""Beam search over the engine's backend, with HF ``generate``'s semantics (so results are comparable).

Per prompt, ``num_beams`` running hypotheses; each step scores every (beam, token) continuation by its
summed log-probability, keeps the best ``max(2, 1 + n_eos) * num_beams`` candidates (enough that ``num_beams``
non-finished ones remain even if the best all end in EOS), moves candidates that end (EOS, or the length
limit) among the top ``num_beams`` into the finished pool scored with the length penalty, and continues with
the best ``num_beams`` unfinished ones. The KV cache rows follow their beams (reordered in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.engine.config import BeamConfig
from workbench.engine.results import GenerationResult

NEG = -1.0e9  # "impossible" score, as in HF (finite so that sums stay ordered)


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens, EOS not included
    text: str
    score: float  # sum of log-probs / generated_len ** length_penalty (EOS counts in the length)
    finish_reason: str  # "eos" | "length"


@dataclass
class BeamStats:
    """``GenerationResult.stats`` of beam search: the ``num_return_sequences`` best hypotheses, best first (the
    result's own tokens and text are the first one's)."""

    hypotheses: list[Hypothesis] = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.hypotheses[0].score


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...], idx [B, M] -> x[b, idx[b, m], ...]."""
    shape = idx.shape + x.shape[2:]
    return x.gather(1, idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(shape))


@torch.inference_mode()
def beam_search(engine, prompts, cfg: BeamConfig) -> list[GenerationResult]:
    if not isinstance(cfg, BeamConfig):
        raise TypeError(f"beam search takes a BeamConfig, got {type(cfg).__name__}")
    prompt_ids = engine.encode_all(prompts)
    eos = sorted(engine.stop_ids(cfg.eos_token_ids))
    B, K, T, lp = len(prompt_ids), cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    keep = max(2, 1 + len(eos)) * K
    dev = engine.device
    session = engine.start([p for p in prompt_ids for _ in range(K)], T,
                           requests=[b for b in range(B) for _ in range(K)], n_requests=B)
    logits = session.logits
    V = logits.shape[-1]
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    run_seq = torch.zeros((B, K, T), dtype=torch.long, device=dev)
    run_score = torch.zeros((B, K), device=dev)
    run_score[:, 1:] = NEG  # all beams start identical: let only the first one expand at step 0
    fin_seq = torch.zeros((B, K, T), dtype=torch.long, device=dev)
    fin_score = torch.full((B, K), NEG, device=dev)
    fin_len = torch.zeros((B, K), dtype=torch.long, device=dev)
    fin_done = torch.zeros((B, K), dtype=torch.bool, device=dev)
    improvable = torch.ones((B, 1), dtype=torch.bool, device=dev)
    in_top = torch.arange(keep, device=dev) < K
    offsets = torch.arange(B, device=dev)[:, None] * K

    with session.decoding():
        for t in range(T):
            logp = torch.log_softmax(logits.float(), -1).view(B, K, V) + run_score[..., None]
            cand_score, cand_idx = torch.topk(logp.view(B, K * V), keep)
            src, tok = cand_idx // V, cand_idx % V
            cand_seq = _gather(run_seq, src)
            cand_seq[:, :, t] = tok
            ends = torch.isin(tok, eos_t) | (t == T - 1)

            # running beams: best K candidates that did not end
            run_cand = cand_score + ends.float() * NEG
            nxt = torch.topk(run_cand, K).indices
            run_seq, run_score, run_src = _gather(cand_seq, nxt), _gather(run_cand, nxt), _gather(src, nxt)

            # finished pool: candidates among the top K that ended, length-penalised
            fin_cand = cand_score / ((t + 1) ** lp)
            if cfg.early_stopping is True:
                fin_cand = fin_cand + fin_done.all(-1, keepdim=True).float() * NEG
            fin_cand = fin_cand + (~improvable).float() * NEG + (~(ends & in_top)).float() * NEG
            merged_score = torch.cat([fin_score, fin_cand], 1)
            best = torch.topk(merged_score, K).indices
            fin_seq = _gather(torch.cat([fin_seq, cand_seq], 1), best)
            fin_score = _gather(merged_score, best)
            fin_len = _gather(torch.cat([fin_len, torch.full_like(cand_score, t + 1, dtype=torch.long)], 1), best)
            fin_done = _gather(torch.cat([fin_done, ends & in_top], 1), best)

            # can a running beam still beat the worst finished one?
            horizon = T if (cfg.early_stopping == "never" and lp > 0) else t + 1
            best_running = run_score[:, :1] / (horizon ** lp)
            worst_fin = torch.where(fin_done, fin_score.min(1, keepdim=True).values, NEG)
            improvable = improvable & (best_running > worst_fin).any(-1, keepdim=True)
            all_full = bool(fin_done.all()) and cfg.early_stopping is True
            if t == T - 1 or not bool(improvable.any()) or all_full or bool(ends.all()):
                break
            session.reorder((run_src + offsets).flatten())
            logits = session.decode(run_seq[:, :, t].reshape(B * K))

    results = []
    eos_set = set(eos)
    for b in range(B):
        stats = BeamStats()
        for k in range(cfg.num_return_sequences):
            ids = fin_seq[b, k, : int(fin_len[b, k])].tolist()
            reason = "eos" if ids and ids[-1] in eos_set else "length"
            if reason == "eos":
                ids = ids[:-1]
            text = engine.tokenizer.decode(ids, skip_special_tokens=True)
            stats.hypotheses.append(Hypothesis(ids, text, float(fin_score[b, k]), reason))
        best = stats.hypotheses[0]
        results.append(GenerationResult(prompt_ids[b], best.token_ids, best.text, best.finish_reason,
                                        stats=stats))
    return results
