"""Step policies: how many tokens to draft before each target pass.

The decoding loop asks its policy for k before every step (0 means a plain target
step) and tells it afterwards how the step went. `ConstantPolicy` always drafts the
same number; `AdaptivePolicy` picks the k that maximises expected tokens per second
from what it has measured in this process.
"""

import statistics
from collections import deque


class ConstantPolicy:
    """Draft exactly `num_draft` tokens every step (fewer only where max_tokens leaves no room)."""

    def __init__(self, num_draft):
        self.num_draft = num_draft

    def choose(self, rows, cap):
        return min(self.num_draft, cap)

    def observe(self, rows, k, drafted, accepted, seconds):
        pass

    def forget(self, row):
        pass


class StepCosts:
    """Wall seconds of a decoding step with k drafts at each batch size, measured in this process.

    A step's time is the whole of it: k draft calls, the target's (k + 1)-token pass, the
    acceptance and the loop's host work, timed from one host read to the next, so timing
    adds no device synchronisation. The first step of each (batch, k) is left out (it
    pays one-off allocations); the median of the last few is kept.

    Single steps scatter by +-25% on a busy CPU, and a k that is seldom chosen keeps the
    few samples it was first timed with. So a k's median is pulled towards the line
    through the medians of every k >= 1 at that batch size, which lends it the other ks'
    samples (k 0, a plain step with no draft and a one-token pass, stands apart).
    """

    kept = 15
    trend_weight = 4.0  # the line counts as this many samples of a k's own

    def __init__(self):
        self.samples = {}

    def record(self, batch, k, seconds):
        key = (batch, k)
        if key not in self.samples:
            self.samples[key] = deque(maxlen=self.kept)  # the warm-up step: not kept
            return
        self.samples[key].append(seconds)

    def known(self, batch, k):
        return bool(self.samples.get((batch, k)))

    def seconds(self, batch, k):
        return self.table(batch, [k])[k]

    def table(self, batch, ks):
        """{k: estimated seconds} for measured ks, each median taken and the line fitted once."""
        medians = {k: (statistics.median(kept), len(kept))
                   for (b, k), kept in self.samples.items() if b == batch and kept}
        trend = self.trend({k: point for k, point in medians.items() if k > 0})
        estimates = {}
        for k in ks:
            median, count = medians[k]
            estimates[k] = median
            if k > 0 and trend is not None:
                weight = self.trend_weight
                estimates[k] = (count * median + weight * trend(k)) / (count + weight)
        return estimates

    @staticmethod
    def trend(points):
        """Least-squares line through {k: (median, sample count)}, weighted by the counts
        (None below two points)."""
        if len(points) < 2:
            return None
        total = sum(n for _, n in points.values())
        mean_k = sum(n * k for k, (_, n) in points.items()) / total
        mean_t = sum(n * t for t, n in points.values()) / total
        spread = sum(n * (k - mean_k) ** 2 for k, (_, n) in points.items())
        slope = sum(n * (k - mean_k) * (t - mean_t) for k, (t, n) in points.items()) / spread
        return lambda k: mean_t + slope * (k - mean_k)


def expected_tokens(a, k):
    """Tokens a step emits on average: accepted drafts (each with probability a, until the
    first rejection) plus the target's own token, (1 - a**(k+1)) / (1 - a)."""
    return k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


class AdaptivePolicy:
    """Pick k in 0..num_draft maximising expected tokens per second for the batch.

    rate(k) = sum over rows of expected_tokens(a_row, k) / seconds(batch, k), with a_row
    a running per-row estimate of per-token acceptance and seconds from StepCosts. One k
    serves the whole batch (rows cannot draft different numbers in one padded pass).
    Every k is first tried once past its warm-up, so each is judged on a measured cost.
    """

    # A new row starts from the pooled acceptance, worth this many drafts: a row's own estimate
    # takes over after a few steps, yet a handful of drafts does not swing k about.
    prior_weight = 16.0
    # Per judged draft: a row's estimate follows its last ~30 drafts, so a drift shows, yet
    # a few rejections in a row do not drop it to k 1, where each step judges one draft
    # and the estimate would take many steps to recover.
    memory = 0.97
    probe_after = 32  # plain steps in a row before one draft token is tried again
    refresh_every = 16  # steps between timings of a neighbour of the best k, whose cost would go stale

    def __init__(self, num_draft, costs=None):
        self.num_draft = num_draft
        self.costs = costs if costs is not None else StepCosts()
        self.rows = {}  # row index -> [accepted, judged], decayed
        self.pooled = [0.0, 0.0]
        self.plain_streak = 0
        self.steps = 0

    def acceptance(self, row):
        """The row's per-token acceptance estimate, pulled towards the pooled one."""
        pooled = (self.pooled[0] + 1) / (self.pooled[1] + 2)
        accepted, judged = self.rows.get(row, (0.0, 0.0))
        return (accepted + self.prior_weight * pooled) / (judged + self.prior_weight)

    def rate(self, acceptances, k, seconds):
        """Expected tokens per second of a k-draft step taking `seconds`, over rows with these acceptances."""
        return sum(expected_tokens(a, k) for a in acceptances) / seconds

    def choose(self, rows, cap):
        candidates = range(min(self.num_draft, cap) + 1)
        for k in candidates:
            if not self.costs.known(len(rows), k):
                return k  # explore: a real step, timed
        seconds = self.costs.table(len(rows), candidates)
        acceptances = [self.acceptance(row) for row in rows]
        best = max(candidates, key=lambda k: self.rate(acceptances, k, seconds[k]))
        self.plain_streak = self.plain_streak + 1 if best == 0 else 0
        if self.plain_streak > self.probe_after and cap > 0:
            # Acceptance is only seen while drafting: look again now and then.
            self.plain_streak = 0
            return 1
        self.steps += 1
        if best > 0 and self.steps % self.refresh_every == 0:
            # A k never chosen keeps the cost it was first timed at, noise and all: time the
            # neighbours of the best again, one above and one below by turns. (While plain
            # steps win, the probe above looks again instead.)
            neighbour = best + (1 if self.steps // self.refresh_every % 2 else -1)
            if neighbour in candidates:
                return neighbour
        return best

    def observe(self, rows, k, drafted, accepted, seconds):
        """Learn from a finished step: k drafts asked for, `drafted` and `accepted` per row, its wall time."""
        self.costs.record(len(rows), k, seconds)
        for row, proposed, count in zip(rows, drafted, accepted):
            judged = min(proposed, count + 1)  # drafts are judged until the first rejection
            past = self.rows.get(row, (0.0, 0.0))
            fade = self.memory**judged
            self.rows[row] = (fade * past[0] + count, fade * past[1] + judged)
            self.pooled[0] += count
            self.pooled[1] += judged

    def forget(self, row):
        self.rows.pop(row, None)


def make_policy(schedule, num_draft):
    """The policy a --draft-schedule names: 'adaptive' (num_draft is its cap) or 'constant'."""
    return AdaptivePolicy(num_draft) if schedule == "adaptive" else ConstantPolicy(num_draft)
