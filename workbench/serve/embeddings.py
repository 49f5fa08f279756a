"""``/v1/embeddings`` from a decoder: mean-pooled hidden states of one layer, L2-normalised.

``dimensions`` truncates to the first ``k`` coordinates and renormalises (Matryoshka-style, Kusupati et al.
2022). A causal LM is not trained for this: expect far weaker retrieval than a trained embedding model (see
``docs/serve.md`` for a measured number).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def embed(model, ids: list[list[int]], *, layer: int = -1, pad_id: int = 0, batch: int = 16) -> torch.Tensor:
    """``[len(ids), d]`` unit vectors: the mean over each input's tokens of hidden state ``layer`` (HF's
    ``hidden_states`` numbering: 0 = embeddings, -1 = the last layer's output after the final norm)."""
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(ids), batch):
        chunk = ids[s: s + batch]
        L = max(len(x) for x in chunk)
        x = torch.full((len(chunk), L), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((len(chunk), L), dtype=torch.long, device=dev)
        for i, t in enumerate(chunk):  # right padding: positions start at 0 for every row
            x[i, : len(t)] = torch.tensor(t, device=dev)
            mask[i, : len(t)] = 1
        h = model(input_ids=x, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states[layer]
        m = mask[..., None].to(h.dtype)
        out.append(F.normalize(((h * m).sum(1) / m.sum(1)).float(), dim=-1))
    return torch.cat(out)


def truncate(vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    if dimensions is None or dimensions == vectors.shape[-1]:
        return vectors
    return F.normalize(vectors[..., :dimensions], dim=-1)
