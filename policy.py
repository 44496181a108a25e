"""Step policies: how many tokens to draft before each target pass.

The decoding loop asks its policy for k before every step (0 means a plain target
step) and tells it afterwards how the step went. `ConstantPolicy` always drafts the
same number; `AdaptivePolicy` picks the k that maximises expected tokens per second
from a model of what a step costs (`StepCosts`), calibrated on purpose where a
calibration exists (calibration.py) and rescaled by the steps it times in this process.
"""

import statistics
from collections import deque
from dataclasses import dataclass, field


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


def monotone_fit(points):
    """Least-squares non-decreasing fit (pool adjacent violators) of {x: (y, weight)}: {x: fitted y}.

    A target's pass never gets cheaper with more rows, so where a measured point lies
    below its left neighbour (noise) the two are pooled to their weighted mean.
    """
    blocks = []  # [sum of weight * y, sum of weight, xs]
    for x in sorted(points):
        y, weight = points[x]
        blocks.append([weight * y, weight, [x]])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, weight, xs = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += weight
            blocks[-1][2] += xs
    return {x: total / weight for total, weight, xs in blocks for x in xs}


@dataclass
class Components:
    """What one step costs at one batch size, measured component by component (calibration.py).

    host: seconds of the loop's own work per step; draft: seconds per draft token (one
    draft call for the whole batch); verify: {rows: seconds} of the target's pass over
    `rows` = tokens per row x batch, measured at a few row counts. `verify_at` fits a
    non-decreasing curve through them, so a row count measured on a noisy call borrows
    from its neighbours, and interpolates (extrapolates along the last segment) between.
    """

    host: float
    draft: float
    verify: dict
    fitted: dict = field(init=False, repr=False)

    def __post_init__(self):
        if not self.verify:
            raise ValueError("Components need the target's pass measured at one row count at least")
        self.verify = {int(rows): float(seconds) for rows, seconds in self.verify.items()}
        self.fitted = monotone_fit({rows: (seconds, 1.0) for rows, seconds in self.verify.items()})

    def verify_at(self, rows):
        """Seconds of the target's pass over `rows` rows (a non-decreasing function of rows)."""
        xs = sorted(self.fitted)
        if rows in self.fitted:
            return self.fitted[rows]
        if rows < xs[0] or len(xs) == 1:
            return self.fitted[xs[0]] if rows < xs[0] else self.fitted[xs[-1]]
        right = next((x for x in xs if x > rows), None)
        left, right = (xs[-2], xs[-1]) if right is None else (max(x for x in xs if x < rows), right)
        slope = (self.fitted[right] - self.fitted[left]) / (right - left)
        return self.fitted[left] + slope * (rows - left)

    def step(self, batch, k):
        """Seconds of a step with k drafts per row: host + k draft calls + the target's (k + 1) x batch rows."""
        return self.host + k * self.draft + self.verify_at((k + 1) * batch)

    def scaled(self, factor):
        """The same costs on a machine `factor` times slower (the host's work included)."""
        return Components(self.host * factor, self.draft * factor,
                          {rows: seconds * factor for rows, seconds in self.verify.items()})


class StepCosts:
    """Wall seconds of a decoding step with k drafts at each batch size: a model, checked against the loop.

    Where `Components` are known for a batch size (calibrated: measured at it, or at a larger
    one whose measured rows reach down to it, as prompts finish and a batch shrinks), a step is predicted as
    host + k * draft + verify((k + 1) x batch), and the steps the loop times rescale that
    prediction: the median ratio of measured to predicted over the recent steps of every
    k, so one measured k informs all of them. A k with steps of its own leans on them too
    (its median, weighed against the rescaled prediction as `trend_weight` samples).

    Without components (an uncalibrated batch size), each k's median is pulled towards
    the line through the medians of every measured k >= 1, which lends a seldom-chosen k
    the others' samples and predicts the ks not yet measured (k 0, a plain step with no
    draft and a one-token pass, stands apart).

    A step's time is the whole of it, timed by the loop from one host read to the next,
    so timing adds no device synchronisation. The first step of each (batch, k) is left
    out (it pays one-off allocations).
    """

    kept = 15
    ratios_kept = 31
    trend_weight = 4.0  # the prediction counts as this many samples of a k's own
    settled = 5  # steps of a k whose median alone is written back as its cost

    def __init__(self, components=None):
        self.components = dict(components or {})  # batch size -> Components
        self.samples = {}  # (batch, k) -> recent seconds
        self.ratios = {}  # batch -> recent measured / predicted seconds

    def model(self, batch):
        """The Components that predict steps at this batch size: its own, or those of the smallest
        larger calibrated batch size whose measured rows reach down to `batch` (None if none)."""
        for size in sorted(self.components):
            if size >= batch and min(self.components[size].verify) <= batch:
                return self.components[size]
        return None

    def calibrated(self, batch):
        return self.model(batch) is not None

    def record(self, batch, k, seconds):
        key = (batch, k)
        if key not in self.samples:
            self.samples[key] = deque(maxlen=self.kept)  # the warm-up step: not kept
            return
        self.samples[key].append(seconds)
        if self.calibrated(batch):
            self.ratios.setdefault(batch, deque(maxlen=self.ratios_kept)).append(
                seconds / self.model(batch).step(batch, k))

    def known(self, batch, k):
        return self.calibrated(batch) or bool(self.samples.get((batch, k)))

    def scale(self, batch):
        """Median of measured / predicted seconds over the recent steps at this batch size (1 before any)."""
        ratios = self.ratios.get(batch)
        return statistics.median(ratios) if ratios else 1.0

    def seconds(self, batch, k):
        return self.table(batch, [k])[k]

    def table(self, batch, ks):
        """{k: estimated seconds} for the ks (all of them when calibrated; else measured ones, or
        any k >= 1 once two ks >= 1 are measured)."""
        medians = {k: (statistics.median(kept), len(kept))
                   for (b, k), kept in self.samples.items() if b == batch and kept}
        if self.calibrated(batch):
            scale, model = self.scale(batch), self.model(batch)
            prior = {k: scale * model.step(batch, k) for k in ks}
            weight = self.trend_weight
        else:
            line = self.trend({k: point for k, point in medians.items() if k > 0})
            prior = {k: line(k) for k in ks if k > 0} if line is not None else {}
            weight = self.trend_weight if line is not None else 0.0
        estimates = {}
        for k in ks:
            median, count = medians.get(k, (0.0, 0))
            if k in prior:
                estimates[k] = (count * median + weight * prior[k]) / (count + weight)
            elif count:
                estimates[k] = median
        return estimates

    @staticmethod
    def trend(points):
        """Least-squares line through {k: (median, sample count)}, weighted by the counts, rising
        with k (None below two points)."""
        if len(points) < 2:
            return None
        total = sum(n for _, n in points.values())
        mean_k = sum(n * k for k, (_, n) in points.items()) / total
        mean_t = sum(n * t for t, n in points.values()) / total
        spread = sum(n * (k - mean_k) ** 2 for k, (_, n) in points.items())
        slope = max(0.0, sum(n * (k - mean_k) * (t - mean_t) for k, (t, n) in points.items()) / spread)
        return lambda k: max(mean_t + slope * (k - mean_k), 1e-9)

    def measured(self, batch):
        """Components of an uncalibrated batch size from the steps timed at it (None unless k 0 and
        a k >= 1 were): each whole step as the target's pass at its rows, no host or draft part, so
        a later run predicts every k from the start and mends the ks it uses (see calibration)."""
        medians = {(k + 1) * batch: statistics.median(kept)
                   for (b, k), kept in self.samples.items() if b == batch and kept}
        if batch not in medians or len(medians) < 2:
            return None
        return Components(0.0, 0.0, medians)

    def calibration(self, batch):
        """The batch size's Components as this process measured them (None if uncalibrated): rescaled,
        and where a k has steps of its own, the target's pass at its rows set to what they imply
        (the steps' median less host and drafts; with fewer than `settled` steps, weighed against
        the model as the estimates are). A calibration taken while the machine was busy thus
        mends itself at the ks that runs use."""
        if not self.calibrated(batch):
            return None
        costs = self.model(batch).scaled(self.scale(batch))
        verify = dict(costs.verify)
        for (b, k), kept in self.samples.items():
            rows = (k + 1) * batch
            if b == batch and kept:
                implied = max(statistics.median(kept) - costs.host - k * costs.draft, 1e-9)
                weight = 0.0 if len(kept) >= self.settled else self.trend_weight
                verify[rows] = (len(kept) * implied + weight * costs.verify_at(rows)) / (len(kept) + weight)
        return Components(costs.host, costs.draft, verify)


def expected_tokens(a, k):
    """Tokens a step emits on average: accepted drafts (each with probability a, until the
    first rejection) plus the target's own token, (1 - a**(k+1)) / (1 - a)."""
    return k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


class AdaptivePolicy:
    """Pick k in 0..num_draft maximising expected tokens per second for the batch.

    rate(k) = sum over rows of expected_tokens(a_row, k) / seconds(batch, k), with a_row
    a running per-row estimate of per-token acceptance and seconds from StepCosts. One k
    serves the whole batch (rows cannot draft different numbers in one padded pass).
    On a calibrated batch size every k is predicted from the start; otherwise k 0, 1 and
    2 are first tried once past their warm-up, and the line through the measured ks
    predicts the rest. A step that is not the best is only tried (to time a neighbour
    of the best, or to look at acceptance again after many plain steps) where it could
    pay: were every draft accepted, it would beat the best's expected rate.
    """

    # A new row starts from the pooled acceptance, worth this many drafts: a row's own estimate
    # takes over after a few steps, yet a handful of drafts does not swing k about.
    prior_weight = 16.0
    # Per judged draft: a row's estimate follows its last ~30 drafts, so a drift shows, yet
    # a few rejections in a row do not drop it to k 1, where each step judges one draft
    # and the estimate would take many steps to recover.
    memory = 0.97
    probe_after = 32  # plain steps in a row before one draft token is tried again ...
    probe_after_most = 512  # ... a gap that doubles each time that draft is rejected, up to this
    refresh_every = 16  # steps between timings of a neighbour of the best k, whose cost would go stale
    # Drafts judged (pooled) before a calibrated run that knows no acceptance lets plain steps win:
    # from the prior alone, one early rejection would send it plain until the next probe, 32 steps on.
    judge_first = 8
    explored = 3  # ks 0 .. explored - 1 are timed first where no calibration predicts them

    def __init__(self, num_draft, costs=None, pooled=None):
        self.num_draft = num_draft
        self.costs = costs if costs is not None else StepCosts()
        self.rows = {}  # row index -> [accepted, judged], decayed
        self.pooled = list(pooled) if pooled is not None else [0.0, 0.0]  # [accepted, judged] over all rows
        self.plain_streak = 0
        self.probe_gap = self.probe_after
        self.probing = False
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
        batch = len(rows)
        candidates = range(min(self.num_draft, cap) + 1)
        if not self.costs.calibrated(batch):
            for k in candidates[: self.explored]:
                if not self.costs.known(batch, k):
                    return k  # explore: a real step, timed
        seconds = self.costs.table(batch, candidates)
        candidates = [k for k in candidates if k in seconds]
        acceptances = [self.acceptance(row) for row in rows]
        rates = {k: self.rate(acceptances, k, seconds[k]) for k in candidates}
        best = max(candidates, key=rates.get)

        def could_pay(k):
            return k in rates and batch * (k + 1) / seconds[k] > rates[best]

        judged = max([self.pooled[1]] + [self.rows.get(row, (0.0, 0.0))[1] for row in rows])
        if best == 0 and judged < self.judge_first and self.costs.calibrated(batch) and could_pay(1):
            return 1  # too few drafts judged to say that drafting cannot pay: judge one more

        self.plain_streak = self.plain_streak + 1 if best == 0 else 0
        if self.plain_streak > self.probe_gap and cap > 0:
            # Acceptance is only seen while drafting: look again now and then. A k 1 this process has
            # not timed is looked at even if its kept cost says it cannot pay: that cost may have been
            # timed on a busy machine, and nothing else would ever time it again.
            self.plain_streak = 0
            if could_pay(1) or not self.costs.samples.get((batch, 1)):
                self.probing = True
                return 1
        self.steps += 1
        if best > 0 and self.steps % self.refresh_every == 0:
            # A k never chosen keeps the cost it was first timed at, noise and all: time the
            # neighbours of the best again, one above and one below by turns. (While plain
            # steps win, the probe above looks again instead.)
            neighbour = best + (1 if self.steps // self.refresh_every % 2 else -1)
            if could_pay(neighbour) or (neighbour in rates and not self.costs.calibrated(batch)):
                return neighbour
        return best

    def observe(self, rows, k, drafted, accepted, seconds):
        """Learn from a finished step: k drafts asked for, `drafted` and `accepted` per row, its wall time."""
        self.costs.record(len(rows), k, seconds)
        if self.probing:  # a draft that keeps being rejected is looked at ever more rarely
            self.probing = False
            self.probe_gap = self.probe_after if any(accepted) else min(2 * self.probe_gap, self.probe_after_most)
        for row, proposed, count in zip(rows, drafted, accepted):
            judged = min(proposed, count + 1)  # drafts are judged until the first rejection
            if not judged:
                continue  # a plain step says nothing of acceptance (and a row told late may have left)
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
