"""The server's Prometheus metrics (prometheus_client), in a registry of the app's own.

GET /metrics gives them in Prometheus' text format; every name starts `speculative_`:
- requests_total{endpoint, status, finish_reason}: requests answered. status is the HTTP
  status (a stream that began is 200; 499: the client went away first; 503: the server shut
  down under it); finish_reason is "stop" or "length", empty when it did not finish.
- prompt_tokens_total, completion_tokens_total: usage of every admitted request
  (completion tokens as `usage.completion_tokens` counts them: what the client received).
- drafted_tokens_total, accepted_tokens_total: the acceptance rate is their ratio
  (rate(accepted) / rate(drafted) on a dashboard).
- num_draft: k, the drafts asked per step, one observation per row per step.
- time_to_first_token_seconds: from admission to the step that gave the row its first token.
- time_per_output_token_seconds: after the first step, the time since the row's previous
  step divided by the tokens this step gave it, one observation per token.
- queue_depth, running_rows: requests waiting for a row, and rows in the batch, when scraped.
"""

import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("server")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
K_BUCKETS = tuple(range(0, 17))
CLIENT_GONE, SHUTTING_DOWN = 499, 503


class Metrics:
    """Counters, histograms and gauges of one server app (one engine.Engine)."""

    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        own = dict(namespace="speculative", registry=registry)
        self.requests = Counter("requests", "Requests answered, by endpoint, HTTP status and finish reason",
                                ["endpoint", "status", "finish_reason"], **own)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of admitted requests", **own)
        self.completion_tokens = Counter("completion_tokens", "Tokens handed to clients (usage.completion_tokens)",
                                         **own)
        self.drafted = Counter("drafted_tokens", "Draft tokens the target verified", **own)
        self.accepted = Counter("accepted_tokens", "Draft tokens the target accepted", **own)
        self.num_draft = Histogram("num_draft", "k, drafts asked per step (one observation per row per step)",
                                   buckets=K_BUCKETS, **own)
        self.first_token = Histogram("time_to_first_token_seconds", "Admission to a request's first token",
                                     buckets=LATENCY_BUCKETS, **own)
        self.per_token = Histogram("time_per_output_token_seconds", "Seconds per token after the first step",
                                   buckets=LATENCY_BUCKETS, **own)
        Gauge("queue_depth", "Requests waiting for a row", **own).set_function(lambda: len(engine.queue))
        Gauge("running_rows", "Requests in the decoding batch", **own).set_function(
            lambda: max(0, len(engine.open) - len(engine.queue)))

    def exposition(self):
        """(body, content type) of GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def refused(self, endpoint, status):
        """A request answered with an error before it was admitted (400, 429, 503)."""
        self.requests.labels(endpoint, str(status), "").inc()


class Tracker:
    """One admitted request's timings and counts; `saw` runs on the engine's thread for every Event."""

    def __init__(self, metrics, endpoint, prompt_tokens):
        self.metrics, self.endpoint, self.prompt_tokens = metrics, endpoint, prompt_tokens
        self.began = time.monotonic()
        self.first = self.last = None
        self.stats = None
        self.reported = False

    def saw(self, event):
        """Record an engine.Event: its step's k and token latencies, and the request's Stats."""
        now, step = time.monotonic(), event.step
        self.stats = event.stats or self.stats
        if step is None or not step.tokens:
            return
        self.metrics.num_draft.observe(step.num_draft)
        if self.first is None:
            self.first = now
            self.metrics.first_token.observe(now - self.began)
        else:
            for _ in step.tokens:
                self.metrics.per_token.observe((now - self.last) / len(step.tokens))
        self.last = now

    def done(self, status, finish_reason=None):
        """Count the request once, by outcome, and log one line: status, tokens, seconds, acceptance."""
        if self.reported:
            return
        self.reported = True
        m, stats = self.metrics, self.stats
        generated, drafted, accepted = (stats.generated, stats.drafted, stats.accepted) if stats else (0, 0, 0)
        m.requests.labels(self.endpoint, str(status), finish_reason or "").inc()
        m.prompt_tokens.inc(self.prompt_tokens)
        m.completion_tokens.inc(generated)
        m.drafted.inc(drafted)
        m.accepted.inc(accepted)
        acceptance = f"{accepted / drafted:.2f}" if drafted else "n/a"
        log.info(f"{status} {self.endpoint} finish {finish_reason or '-'}: prompt {self.prompt_tokens} tokens, "
                 f"completion {generated}, {time.monotonic() - self.began:.2f} s, acceptance {acceptance}")
