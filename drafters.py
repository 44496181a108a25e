"""Drafters: who proposes the tokens the target checks.

A drafter serves one batch of rows (slots). The decoding loop calls `start` with the
batch's prompts, then before each step `available(cap)` (how many tokens it could
propose at most) and `propose(newest, k, sampling)`, after it `settle(newest, k,
accepted, proposed)`; `replace_rows` and `keep_rows` follow the batch as prompts come and go.

`propose` returns (drafts (batch, k) int32, q, counts): q is the drafter's distribution
(batch, k, vocab) for sampled acceptance, or None for a deterministic drafter (a point
mass on each proposed token); counts says how many of each row's k drafts are real
(None: all of them), the rest being filler the target must not accept.
"""

import mlx.core as mx

from sampling import distribution, sample


def left_padded(sequences):
    """(tokens (batch, width), padding (batch,) or None) with each sequence right-aligned."""
    width = max(len(s) for s in sequences)
    padding = [width - len(s) for s in sequences]
    tokens = mx.array([[0] * pad + s for pad, s in zip(padding, sequences)])
    return tokens, (padding if any(padding) else None)


class ModelDrafter:
    """Drafts with a small model of the target's vocabulary, which keeps its own cache.

    After every step the draft's cache holds each row's emitted tokens except those in
    `unseen` and the newest (the next input): a row that accepted every draft has not
    fed the draft its own last proposal, and a plain step (k 0) does not run the draft.
    """

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.unseen = []

    def start(self, prompts, firsts):
        self.cache, _ = self.model.start(prompts)
        self.unseen = [[] for _ in prompts]

    def replace_rows(self, slots, prompts, firsts):
        fresh, _ = self.model.start(prompts)
        self.cache.replace_rows(slots, fresh)
        for slot in slots:
            self.unseen[slot] = []

    def keep_rows(self, slots):
        self.cache.keep_rows(slots)
        self.unseen = [self.unseen[slot] for slot in slots]

    def available(self, cap):
        return cap

    def propose(self, newest, k, sampling):
        """k tokens per row after `newest`; nothing here waits on the device."""
        inputs, padding = left_padded([unseen + [token] for unseen, token in zip(self.unseen, newest)])
        tokens, dists = [], []
        for _ in range(k):
            logits = self.model.decode(inputs, self.cache, padding)[:, -1]
            padding = None
            if sampling.greedy:
                token = mx.argmax(logits, axis=-1)
            else:
                dists.append(distribution(logits, sampling))
                token = sample(dists[-1])
            token = token.astype(mx.int32)
            mx.async_eval(token)
            tokens.append(token)
            inputs = token[:, None]
        return mx.stack(tokens, axis=1), (mx.stack(dists, axis=1) if dists else None), None

    def settle(self, newest, k, accepted, proposed):
        """Trim what the draft saw past each row's accepted prefix; note what it has not seen.

        newest: the tokens this step fed the target first; proposed: each row's k drafts.
        """
        if k == 0:
            # The draft did not run, so it was not fed this step's input either.
            self.unseen = [unseen + [token] for unseen, token in zip(self.unseen, newest)]
            return
        # The draft consumed its inputs and its first k - 1 proposals.
        self.cache.trim([k - 1 - count if count < k else 0 for count in accepted])
        self.unseen = [drafts[k - 1 :] if count == k else [] for count, drafts in zip(accepted, proposed)]
