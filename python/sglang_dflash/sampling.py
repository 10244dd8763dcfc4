"""Sampling parameters -> the exact distribution SGLang's non-speculative sampler draws from.

Speculative sampling is lossless only if the target distribution p it preserves is the one the plain
sampler would use. SGLang 0.5.23 (`srt/layers/sampler.py`, pytorch backend) does, per row:
    probs = softmax(logits / temperature)
    sort descending; cumsum computed once on the sorted probs;
    zero sorted entries at rank >= top_k; zero entries whose preceding mass (cumsum - p) > top_p;
    if min_p > 0: zero entries < min_p * (largest prob);
    multinomial over what is left (so: renormalised).
`processed_probs` returns that renormalised distribution in vocabulary order. The drafter's q uses the
same processing, so drafts are drawn from what the drafter would sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_EPS = 1e-6  # SGLang treats temperature below this as greedy


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = -1  # -1 or 0: whole vocabulary
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}, expected a number >= 0")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k not in (-1, 0)):
            raise ValueError(f"top_k={self.top_k!r}, expected -1/0 (off) or an integer >= 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}, expected a number in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r}, expected a number in [0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1


def processed_probs(
    logits: torch.Tensor,  # [n, V]
    temperature: torch.Tensor,  # [n] float, > 0
    top_k: torch.Tensor,  # [n] int64, >= 1 (use V for "off")
    top_p: torch.Tensor,  # [n] float in (0, 1]
    min_p: torch.Tensor,  # [n] float in [0, 1]
    *,
    filtered: bool = True,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """-> probs [n, V] float32, each row the renormalised distribution SGLang samples from.

    The two shortcuts SGLang's own sampler takes, from host-side batch facts (no sync): `filtered=False`
    when no row asks for top-k, top-p or min-p (its `simple_sampling_case`: the softmax itself, no sort), and
    `max_top_k` (>= every row's top_k) to rank only that many columns with a top-k instead of sorting the
    whole vocabulary (columns past it are zeroed by the top-k rule anyway)."""
    probs = torch.softmax(logits.float() / temperature[:, None].float(), dim=-1)
    if not filtered:
        return probs
    if max_top_k is not None and max_top_k < probs.shape[-1]:
        sorted_p, order = probs.topk(max_top_k, dim=-1, sorted=True)
    else:
        sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    rank = torch.arange(sorted_p.shape[-1], device=probs.device)[None, :]
    sorted_p = sorted_p.masked_fill(rank >= top_k[:, None], 0.0)
    sorted_p = sorted_p.masked_fill((cum - sorted_p) > top_p[:, None], 0.0)
    threshold = sorted_p[:, :1] * min_p[:, None]
    sorted_p = sorted_p.masked_fill(sorted_p < threshold, 0.0)
    sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def probs_for(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One request's parameters applied to logits [n, V] -> probs [n, V]."""
    n, V = logits.shape
    dev = logits.device
    top_k = params.top_k if params.top_k >= 1 else V
    return processed_probs(
        logits,
        torch.full((n,), params.temperature, device=dev),
        torch.full((n,), top_k, device=dev, dtype=torch.int64),
        torch.full((n,), params.top_p, device=dev),
        torch.full((n,), params.min_p, device=dev),
        filtered=top_k < V or params.top_p < 1 or params.min_p > 0,
        max_top_k=top_k,
    )
