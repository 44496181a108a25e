"""Drafters: who proposes the tokens the target checks.

A drafter serves one batch of rows (slots). The decoding loop calls `start` with the
batch's prompts, then before each step `available(cap)` (how many tokens it could
propose at most) and `propose(newest, k, sampling)`, after it `settle(newest, k,
accepted, proposed, verdicts)`; `replace_rows` and `keep_rows` follow the batch as prompts come and go.

`propose` returns (drafts (batch, k) int32, q, counts): q is the drafter's distribution
(batch, k, vocab) for sampled acceptance, or None for a deterministic drafter (a point
mass on each proposed token); counts says how many of each row's k drafts are real
(None: all of them), the rest being filler the target must not accept.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import mlx.core as mx
import numpy as np

from sampling import adjusted, distribution, position_keys, sample


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

    reads_the_text = False  # it drafts from its own cache: a plain step's successor may be queued before its read

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
        """k tokens per row after `newest` (sampling: one setting, or one per row); nothing here waits on the device."""
        inputs, padding = left_padded([unseen + [token] for unseen, token in zip(self.unseen, newest)])
        tokens, dists = [], []
        # Rows with their own random streams draw draft i from their key for position i, the same
        # whatever k the batch asked for.
        keys = position_keys(sampling.keys, k) if k and sampling.keys is not None else None
        greedy = sampling.greedy_rows
        for i in range(k):
            logits = adjusted(self.model.decode(inputs, self.cache, padding)[:, -1], sampling)
            padding = None
            if sampling.greedy:
                token = mx.argmax(logits, axis=-1)
            else:
                dists.append(distribution(logits, sampling))
                token = sample(dists[-1], None if keys is None else keys[:, i])
                if np.any(greedy):  # greedy rows beside sampled ones keep the draft's argmax
                    token = mx.where(mx.array(greedy), mx.argmax(logits, axis=-1), token)
            token = token.astype(mx.int32)
            mx.async_eval(token)
            tokens.append(token)
            inputs = token[:, None]
            sampling = sampling.seen(token)  # the next draft is penalised for this one too
        return mx.stack(tokens, axis=1), (mx.stack(dists, axis=1) if dists else None), None

    def settle(self, newest, k, accepted, proposed, verdicts):
        """Trim what the draft saw past each row's accepted prefix; note what it has not seen.

        newest: the tokens this step fed the target first; proposed: each row's k drafts;
        verdicts: the target's token after each row's accepted prefix.
        """
        if k == 0:
            # The draft did not run, so it was not fed this step's input either.
            self.unseen = [unseen + [token] for unseen, token in zip(self.unseen, newest)]
            return
        # The draft consumed its inputs and its first k - 1 proposals.
        self.cache.trim([k - 1 - count if count < k else 0 for count in accepted])
        self.unseen = [drafts[k - 1 :] if count == k else [] for count, drafts in zip(accepted, proposed)]


class PromptLookupDrafter:
    """Drafts by copying: the text so far is searched for its own latest n tokens.

    Each row's history is its prompt followed by its output. Before a step, the longest
    suffix of the output (n from ngram_max down to 1) that occurred earlier in the
    history, most recent occurrence first, proposes the tokens that followed it; the
    copy runs on through the proposal itself, so a repeating span keeps repeating. No
    match: the row proposes nothing. Deterministic, so q is a point mass; it needs no
    model, so a draft costs only this host-side lookup. For a decoder-only model the
    prompt is the start of the output (a row's first input is its prompt's last token);
    for T5 the output is the decoder's own tokens and the prompt is only searched.
    """

    reads_the_text = True  # its proposals come from the tokens the host has read

    def __init__(self, ngram_max=3):
        self.ngram_max = ngram_max
        self.rows = []

    def start(self, prompts, firsts):
        self.rows = [History(prompt, first, self.ngram_max) for prompt, first in zip(prompts, firsts)]

    def replace_rows(self, slots, prompts, firsts):
        for slot, prompt, first in zip(slots, prompts, firsts):
            self.rows[slot] = History(prompt, first, self.ngram_max)

    def keep_rows(self, slots):
        self.rows = [self.rows[slot] for slot in slots]

    def available(self, cap):
        self.proposals = [row.lookup(cap) for row in self.rows]
        return max(map(len, self.proposals), default=0)

    def propose(self, newest, k, sampling):
        counts = [min(len(p), k) for p in self.proposals]
        # Rows with fewer proposals are filled up with token 0; `counts` keeps them from being accepted.
        drafts = [p[:k] + [0] * (k - count) for p, count in zip(self.proposals, counts)]
        return mx.array(drafts, mx.int32), None, counts

    def settle(self, newest, k, accepted, proposed, verdicts):
        for row, count, drafts, verdict in zip(self.rows, accepted, proposed, verdicts):
            row.extend(drafts[:count] + [verdict])


class History:
    """One row's prompt and output, with the position that followed each n-gram's latest occurrence."""

    def __init__(self, prompt, first, ngram_max):
        self.ngram_max = ngram_max
        self.tokens = []
        self.follows = {}  # n-gram (tuple) -> index of the token after its latest occurrence
        continues = bool(prompt) and first == prompt[-1]
        self.extend(prompt if continues else prompt + [first])
        # Suffixes are taken from the output: a decoder-only model's output starts with its prompt.
        self.output_start = 0 if continues else len(prompt)

    def extend(self, tokens):
        for token in tokens:
            end = len(self.tokens)
            for n in range(1, min(self.ngram_max, end) + 1):
                self.follows[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def lookup(self, cap):
        """Up to `cap` tokens that followed the latest earlier occurrence of the longest suffix."""
        if cap <= 0:
            return []
        output = len(self.tokens) - self.output_start
        for n in range(min(self.ngram_max, output), 0, -1):
            start = self.follows.get(tuple(self.tokens[-n:]))
            if start is not None:
                proposal = []
                for i in range(cap):
                    at = start + i
                    proposal.append(self.tokens[at] if at < len(self.tokens) else proposal[at - len(self.tokens)])
                return proposal
        return []
