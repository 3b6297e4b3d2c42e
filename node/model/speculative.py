"""Speculative decoding's pure parts: drafting by prompt lookup, verifying a draft, and choosing its length.

A ring's first stage knows every token of its session (it embeds them), so it drafts the next few tokens by
prompt lookup: the tokens that followed the latest earlier occurrence of the context's last n-gram. The
draft rides the step of the token just sampled through every stage in one pass, and the last stage keeps
what the model agrees with (`verify_draft`), plus the token the model picks after it, so a round yields
one to k + 1 tokens for one trip round the ring.

Verification keeps the output what decoding without a draft would give:
- greedy: a draft token is kept while it is the argmax at its position; the first that is not is replaced
  by the argmax. The tokens are those of plain greedy decoding (up to the batched pass's rounding).
- sampling: standard speculative sampling with a deterministic draft (a point mass on d): d is kept with
  probability p(d), else the token is drawn from p with d removed and renormalised; the result is
  distributed as p. The draws use the (seed, position) generator (`node.model.sampling`), so a failover's
  replay draws the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from node.model.sampling import SamplingParams, position_generator, sample, token_probs

MAX_DRAFT_TOKENS = 16  # the protocol's bound on a draft (`speculate` at open)


def propose_draft(history: Sequence[int], k: int, *, max_ngram: int = 4, min_ngram: int = 1,
                  window: int = 4096) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the last n tokens of `history`
    (n from `max_ngram` down to `min_ngram`, longest match first), looked up in its last `window` tokens;
    [] when nothing matches."""
    if k < 1 or len(history) < min_ngram + 1:
        return []
    tokens = list(history[-window:])
    end = len(tokens)
    for n in range(min(max_ngram, end - 1), min_ngram - 1, -1):
        tail = tokens[end - n:]
        for start in range(end - n - 1, -1, -1):  # latest occurrence first: recent text predicts best
            if tokens[start: start + n] == tail:
                follow = tokens[start + n: start + n + k]
                if follow:
                    return follow
    return []


def verify_draft(logits: torch.Tensor, draft: Sequence[int], params: SamplingParams, position: int) -> list[int]:
    """`logits` [len(draft) + 1, vocab]: row i is computed for the token at `position + i`, where draft[i] was
    proposed. Returns the draft tokens kept and then the model's own token after them (1..len(draft)+1)."""
    if logits.shape[0] != len(draft) + 1:
        raise ValueError(f"{len(draft)} draft tokens need {len(draft) + 1} rows of logits, got {logits.shape[0]}")
    kept: list[int] = []
    for i, proposed in enumerate(draft):
        at = position + i
        if params.temperature == 0:
            choice = int(logits[i].argmax())
            if choice != proposed:
                return [*kept, choice]
        else:
            probs = token_probs(logits[i], params)
            probs = probs / probs.sum()
            generator = position_generator(params.seed, at)
            if float(torch.rand((), generator=generator)) >= float(probs[proposed]):
                residual = probs.clone()
                residual[proposed] = 0  # max(0, p - q) for q the point mass on the draft token
                return [*kept, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
        kept.append(proposed)
    return [*kept, sample(logits[len(draft)], params, position + len(draft))]


@dataclass
class DraftLength:
    """How many tokens to draft, from the acceptance rate and the ring's round time seen so far.

    A round of d draft tokens yields E(d) = (1 - a^(d+1)) / (1 - a) tokens on average (each draft token kept
    with probability a, independently) and takes T(d) = t0 + c d (t0: a round without a draft, legs and
    compute; c: each further position's compute). The length is the d in [0, limit] of most tokens per second,
    E(d) / T(d): long drafts where legs dominate and drafts are good, none where compute dominates."""

    limit: int
    accepted: float = 1.0  # decayed counts: draft tokens kept, and rounds that rejected one (a prior of 1/2)
    rejected: float = 1.0
    round_s: float | None = None  # t0
    per_token_s: float | None = None  # c

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, drafted: int, kept: int, round_s: float) -> None:
        """A round of `drafted` draft tokens kept `kept` of them and took `round_s`."""
        if drafted > 0:
            self.accepted = 0.9 * self.accepted + kept
            self.rejected = 0.9 * self.rejected + (kept < drafted)
        if drafted == 0 or self.round_s is None:
            self.round_s = round_s if self.round_s is None else 0.8 * self.round_s + 0.2 * round_s
            return
        extra = max(0.0, round_s - self.round_s) / drafted
        self.per_token_s = extra if self.per_token_s is None else 0.8 * self.per_token_s + 0.2 * extra

    def choose(self) -> int:
        if self.limit < 1:
            return 0
        if self.round_s is None:
            return min(self.limit, 4)  # nothing measured yet: a middling draft
        a = min(self.acceptance, 0.999)
        c = self.per_token_s if self.per_token_s is not None else 0.05 * self.round_s

        def rate(d: int) -> float:
            return (1 - a ** (d + 1)) / (1 - a) / (self.round_s + c * d)

        return max(range(self.limit + 1), key=rate)
