"""The Python API: load a target with its drafter once, then generate or stream text.

    import api
    pair = api.load("mlx_models/gpt2-xl", draft="mlx_models/gpt2")   # or prompt_lookup=True, or neither
    done = api.generate(pair, "The meaning of life is", max_tokens=40)
    print(done.text, done.finish_reason, done.stats.acceptance_rate)
    for piece in api.stream(pair, "Once upon a time", temperature=0.8, seed=1, stop=["\\n\\n"]):
        print(piece, end="", flush=True)

main.py and server.py call the same functions; the server decodes its requests together
through an `engine.Engine` (continuous batching), each with its own `Settings`.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux: `import api` may come first)

import math
import numbers
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

import calibration
import decoder
import distributed
import drafters
import model
import policy
from textstream import REPLACEMENT, TextStream, text_of  # noqa: F401  (text_of: part of this interface)
from tokenizer import check_text


class UsageError(ValueError):
    """A bad value, folder or prompt: its message is one line that says what to change.

    param: the request field at fault ("prompt", "max_tokens", ...: the server's 400 names
    it), or None.
    """

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


@dataclass
class Pair:
    """A loaded target, its draft model (or None), its tokenizer, and who drafts."""

    target: object
    draft: object
    tokenizer: object
    name: str
    prompt_lookup: bool = False
    ngram_max: int = 3
    folders: tuple = None  # (target, draft) as loaded: where their kept step costs are found

    def drafter(self):
        """A fresh Drafter for one run of the step loop, or None for plain decoding."""
        if self.prompt_lookup:
            return drafters.PromptLookupDrafter(self.ngram_max)
        return decoder.as_drafter(self.draft)

    @property
    def models(self):
        return [m for m in (self.target, self.draft) if m is not None]

    @cached_property
    def kept_costs(self):
        """The identity of this pair's step costs kept by calibration.py (batch size 1), or None
        (no draft model, or not loaded from folders); its fingerprints are read once, at first use."""
        if self.draft is None or self.prompt_lookup or self.folders is None:
            return None
        try:
            return calibration.identity(*self.folders, 1)
        except (OSError, ValueError, model.LoadError):  # a folder gone or changed since it loaded: nothing kept
            return None

    def policy(self, schedule, num_draft, batches=(1,)):
        """The StepPolicy a schedule names; the adaptive one starts from the costs kept for this pair
        at each of the batch sizes `batches` (those a run may decode at)."""
        fields = self.kept_costs if schedule == "adaptive" else None
        if fields is None:
            return policy.make_policy(schedule, num_draft)
        return calibration.adaptive_policy(num_draft, fields, batches=list(batches))

    def remember(self, chosen, batches=(1,)):
        """Keep what an adaptive policy measured at the batch sizes `batches` (see calibration.remember)."""
        fields = self.kept_costs
        if fields is not None and isinstance(chosen, policy.AdaptivePolicy):
            calibration.remember_over(chosen, fields, batches)

    @cached_property
    def longest_token(self):
        """The most characters one token of the vocabulary spells (special tokens included)."""
        return max(map(len, self.tokenizer.get_vocab()))

    def max_prompt_chars(self, max_context=None):
        """The most characters a prompt within the models' context can have (None: no limit).

        A token spells at most `longest_token` characters, so a longer text cannot fit:
        the server refuses it before tokenising it.
        """
        limits = [limit for m in self.models for limit in [context_limits(m, max_context)[0]] if limit is not None]
        return min(limits) * self.longest_token if limits else None


def require_models(*paths):
    """Raise a UsageError naming every model among `paths` (None: none wanted) that is not there."""
    missing = [name for name in paths if name is not None and model.find(name) is None]
    if missing:
        raise UsageError(str(model.not_found(missing)))


def load_models(target_path, draft_path=None, pipeline=None):
    """(target, draft or None, tokenizer); a bad folder or mismatched vocabularies is a UsageError.

    pipeline: a distributed.Group over whose ranks the target is split (rank 0's side).
    """
    require_models(target_path, draft_path)
    try:
        target, tokenizer = model.load(target_path) if pipeline is None else distributed.load_target(target_path, pipeline)
        draft, draft_tokenizer = (None, None) if draft_path is None else model.load(draft_path)
    except model.LoadError as error:
        raise UsageError(str(error)) from None
    families = [type(m).__module__.split(".")[-1] for m in (distributed.local(target), draft) if m is not None]
    # Decoder-only models (own or mlx-lm's) decode alike; T5 starts from its encoder.
    if len({name == "t5" for name in families}) > 1:
        raise UsageError(f"draft and target are of different families ({families[1]} draft, {families[0]} target); "
                         f"speculative decoding needs one family and one tokenizer")
    if draft is not None:
        check_vocabularies(distributed.local(target), draft, tokenizer, draft_tokenizer)
    return target, draft, tokenizer


def check_vocabularies(target, draft, tokenizer, draft_tokenizer):
    """A UsageError unless draft and target share a tokenizer and logits as wide (an mlx-lm
    model narrower than the other, as Qwen's padded embeddings, is widened with -inf logits)."""
    # Same size is not enough: a token id must mean the same text to both.
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UsageError("draft and target vocabularies differ (their tokenizers map tokens to different ids)")
    narrow, wide = sorted((draft, target), key=lambda m: m.vocab_size)
    if narrow.vocab_size != wide.vocab_size and hasattr(narrow, "widen") and len(tokenizer) <= narrow.vocab_size:
        narrow.widen(wide.vocab_size)
    if draft.vocab_size != target.vocab_size:
        raise UsageError(f"draft and target vocabularies differ ({draft.vocab_size} vs {target.vocab_size} tokens)")


def load(target, draft=None, prompt_lookup=False, ngram_max=3):
    """Load a Pair: `target` and `draft` are converted folders or names under mlx_models/.

    draft None and prompt_lookup False: plain decoding. prompt_lookup drafts by copying
    from the prompt and the output (no draft model). Raises UsageError.
    """
    if draft is not None and prompt_lookup:
        raise UsageError("give a draft model or prompt lookup, not both")
    target_model, draft_model, tokenizer = load_models(target, draft)
    return Pair(target_model, draft_model, tokenizer, Path(target).name, prompt_lookup, ngram_max, (target, draft))


# The most likely tokens a request may ask log-probabilities of, per position (OpenAI's own limit).
MOST_LOGPROBS = 20


@dataclass
class Settings:
    """How one prompt is decoded.

    max_tokens: tokens at most; temperature 0 is greedy, else sampling after top_k (0: all),
    top_p and min_p (0: none); seed: the row's own random stream (None: MLX's global generator); stop:
    strings that end the text (left out of it); delta: acceptance relaxation in [0, 1];
    num_draft: drafts per step at most; schedule: 'adaptive' or 'constant' (the engine
    has one schedule for all rows); logprobs: None, or n in 0..20 for each token's
    log-probability under the target and the n most likely tokens' (decoder.Step.logprobs);
    logit_bias ({token id: value in [-100, 100]} added to its logit), presence_penalty and
    frequency_penalty (in [-2, 2]) as OpenAI's (sampling.Sampling).
    """

    max_tokens: int = 100
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = None
    stop: list = field(default_factory=list)
    delta: float = 0.0
    num_draft: int = 5
    schedule: str = "adaptive"
    logprobs: int = None
    logit_bias: dict = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0

    def problem(self, name=str):
        """The first value out of range as one line, or None; name(field) spells a field (e.g. as a flag)."""
        found = self.invalid(name)
        return found and found[1]

    def invalid(self, name=str):
        """(field, one line) of the first value out of range, or None."""
        bad_bias = self.bad_bias()
        rules = [
            ("num_draft", self.num_draft >= 1, f"{name('num_draft')} must be at least 1, got {self.num_draft}"),
            ("delta", 0.0 <= self.delta <= 1.0, f"{name('delta')} must lie in [0, 1], got {self.delta}"),
            ("temperature", 0.0 <= self.temperature < math.inf,
             f"{name('temperature')} must be finite and not negative, got {self.temperature}"),
            ("top_p", 0.0 < self.top_p <= 1.0, f"{name('top_p')} must lie in (0, 1], got {self.top_p}"),
            ("min_p", 0.0 <= self.min_p <= 1.0, f"{name('min_p')} must lie in [0, 1], got {self.min_p}"),
            ("top_k", self.top_k >= 0, f"{name('top_k')} must not be negative, got {self.top_k}"),
            ("max_tokens", self.max_tokens >= 1, f"{name('max_tokens')} must be at least 1, got {self.max_tokens}"),
            ("seed", self.seed is None or 0 <= self.seed < 2**64,
             f"{name('seed')} must lie in [0, 2**64), got {self.seed}"),
            ("schedule", self.schedule in ("adaptive", "constant"), f"{name('schedule')} must be adaptive or constant"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MOST_LOGPROBS,
             f"{name('logprobs')} must lie in [0, {MOST_LOGPROBS}], got {self.logprobs}"),
            ("logit_bias", bad_bias is None,
             f"{name('logit_bias')} must map token ids to values in [-100, 100], got {bad_bias}"),
            *((penalty, -2.0 <= getattr(self, penalty) <= 2.0,
               f"{name(penalty)} must lie in [-2, 2], got {getattr(self, penalty)}")
              for penalty in ("presence_penalty", "frequency_penalty")),
        ]
        return next(((field, message) for field, ok, message in rules if not ok), None)

    def bad_bias(self):
        """The first logit_bias entry {token: value} that is not a token id with a value in [-100, 100], or None."""
        bad = next(((t, b) for t, b in (self.logit_bias or {}).items()
                    if not (isinstance(t, int) and t >= 0 and -100 <= b <= 100)), None)
        return None if bad is None else {bad[0]: bad[1]}

    @property
    def sampling(self):
        return decoder.Sampling(self.temperature, self.top_k, self.top_p, logit_bias=self.logit_bias,
                                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                                min_p=self.min_p)


def settings(**values):
    """Settings from keyword arguments; an unknown name or a value out of range is a UsageError."""
    unknown = set(values) - {f.name for f in fields(Settings)}
    if unknown:
        raise UsageError(f"unknown setting {sorted(unknown)[0]!r}")
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    chosen = Settings(**values)
    message = chosen.problem()
    if message:
        raise UsageError(message)
    return chosen


def lowered(limit, max_context):
    """A model's limit in tokens, lowered to max_context where that is given (None: no limit)."""
    return max_context if limit is None else limit if max_context is None else min(limit, max_context)


def context_limits(m, max_context=None):
    """(prompt tokens, positions the output reaches, whether the prompt counts towards them) of model m.

    Causal models (GPT-2's table, Llama's max_position_embeddings): the prompt and the
    output share max_positions. T5: the encoder takes max_source_positions, the decoder
    max_positions (both config.json's n_positions, 512 if absent). max_context lowers both.
    """
    shared = m.max_source_positions is None
    prompt = m.max_positions if shared else m.max_source_positions
    return lowered(prompt, max_context), lowered(m.max_positions, max_context), shared


def check_lengths(prompt_ids, max_tokens, models, name="--max-tokens", max_context=None, prompt_param="prompt"):
    """A UsageError when the longest prompt, or it plus max_tokens, runs past a model's context.

    Its param is `prompt_param` when the prompt alone is too long, else "max_tokens".
    """
    longest = max(max(len(ids), 1) for ids in prompt_ids)  # an empty prompt starts from one BOS token
    which = "the longest prompt" if len(prompt_ids) > 1 else "the prompt"
    for m in models:
        prompt_limit, limit, shared = context_limits(m, max_context)
        source = "the model has" if max_context is None or limit < max_context else "the server allows"
        if prompt_limit is not None and longest > prompt_limit:
            raise UsageError(f"{which} has {longest} tokens; {source} {prompt_limit} positions", prompt_param)
        needed = longest + max_tokens - 1 if shared else max_tokens
        if limit is not None and needed > limit:
            what = f"{which} plus {name}" if shared else name
            raise UsageError(f"{what} needs {needed} positions; {source} {limit}", "max_tokens")


def check_ids(ids, vocab_size, param="prompt"):
    """A UsageError unless `ids` are token ids of a vocabulary of `vocab_size` (integers in [0, vocab_size))."""
    bad = next((t for t in ids if not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise UsageError(f"{param} holds {bad!r}, not a token id in [0, {vocab_size})", param)


def encode_text(tokenizer, text, add_special_tokens=True, max_chars=None, param="prompt"):
    """The token ids of `text`: a UsageError (param `param`) for text that is not valid Unicode
    (a lone surrogate) or longer than max_chars characters, before any tokenising."""
    if max_chars is not None and len(text) > max_chars:
        raise UsageError(f"{param} has {len(text)} characters, more than a prompt within the context can spell "
                         f"({max_chars})", param)
    try:
        check_text(text)
    except ValueError as error:
        raise UsageError(f"{param}: {error}", param) from None
    return tokenizer(text, add_special_tokens=add_special_tokens).input_ids


def encode(pair, prompt, max_tokens, name="max_tokens", add_special_tokens=True, max_context=None, param="prompt"):
    """The prompt's token ids; a UsageError (param "prompt"/`param` or "max_tokens") if it is not valid
    Unicode, or it plus max_tokens does not fit the models' context (max_context may lower it)."""
    ids = encode_text(pair.tokenizer, prompt, add_special_tokens, pair.max_prompt_chars(max_context), param)
    check_lengths([ids], max_tokens, pair.models, name, max_context, param)
    return ids


class StopText:
    """Text handed on until a stop string appears; a tail that may begin one is held back."""

    def __init__(self, stop):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text, final=False):
        """The part of `text` (after what is held back) that can be handed on; sets `stopped`."""
        if self.stopped:
            return ""
        self.pending += text
        found = [at for at in (self.pending.find(s) for s in self.stop) if at >= 0]
        if found:
            self.stopped = True
            return self.pending[: min(found)]
        held = 0 if final else max((n for s in self.stop for n in range(len(s) - 1, 0, -1)
                                    if self.pending.endswith(s[:n])), default=0)
        given, self.pending = self.pending[: len(self.pending) - held], self.pending[len(self.pending) - held :]
        return given


class Generation:
    """One request's output as its Step records arrive: whole characters, cut before a stop string.

    `add(step)` returns the new text; `finish_reason` becomes "stop" (EOS or a stop string)
    or "length" (max_tokens) when the request is done. `tokens` are the tokens the text
    handed on is made of: a stop string cuts them at the last token that gave text before
    it (tokens decoded past it, whether one at a time or drafted in one step, are not the
    client's), so a plain and a speculative run that hand on one text count the same.
    stats: the request's decoder.Stats, whose `generated` is set to len(tokens) at a stop
    string (drafted, accepted and target_calls still count all the work done). logprobs:
    one entry per token (decoder.Step.logprobs) where the request asked for them, else None.
    """

    def __init__(self, tokenizer, eos_token_ids, stop=(), stats=None):
        self.tokenizer = tokenizer
        self.text = TextStream(tokenizer)
        self.stop = StopText(stop)
        self.eos_token_ids = eos_token_ids
        self.stats = stats
        self.tokens = []
        self.logprobs = None
        self.logprobs_handed = 0  # entries of logprobs handed on so far (new_logprobs)
        self.handed = 0  # characters handed on so far
        self.finish_reason = None

    def add(self, step):
        if self.finish_reason:
            return ""
        self.tokens += step.tokens
        if step.logprobs is not None:
            self.logprobs = (self.logprobs or []) + step.logprobs
        piece = self.stop.feed(self.text.add(step.tokens))
        if not self.stop.stopped and step.finished:
            piece += self.stop.feed(self.text.finish(), final=True)
        self.handed += len(piece)
        if self.stop.stopped:
            self.finish_reason = "stop"
            self.cut()
        elif step.finished:
            self.finish_reason = "stop" if self.tokens[-1] in self.eos_token_ids else "length"
        return piece

    def cut(self):
        """Drop the tokens past the last one that the text handed on needs."""
        n = len(self.tokens)
        while n > 0 and len(text_of(self.tokenizer, self.tokens[: n - 1]).rstrip(REPLACEMENT)) >= self.handed:
            n -= 1
        del self.tokens[n:]
        if self.logprobs is not None:
            del self.logprobs[n:]
        if self.stats is not None:
            self.stats.generated = n


    def new_logprobs(self):
        """The logprobs entries not handed on yet (None if none were asked): those of the tokens so far,
        which a stop string may cut afterwards (a stream cannot take back what it sent)."""
        if self.logprobs is None:
            return None
        given = self.logprobs[self.logprobs_handed :]
        self.logprobs_handed = len(self.logprobs)
        return given


@dataclass
class Completion:
    """A finished generation: its text, token ids, "stop" or "length", and its decoder.Stats.

    tokens: the ids the text is made of (cut at a stop string as Generation says);
    stats.generated == len(tokens); logprobs: one decoder.Step.logprobs entry per token
    where Settings.logprobs asked for them, else None.
    """

    text: str
    tokens: list
    finish_reason: str
    stats: decoder.Stats
    logprobs: list = None


def request(pair, prompt, chosen, stats=None, max_context=None):
    """A decoder.Request for text `prompt` (or token ids) with Settings `chosen`.

    Everything that can be checked of one request is checked here, before it joins a
    batch: its settings, its token ids, its length. Raises UsageError.
    """
    problem = chosen.problem()
    if problem:
        raise UsageError(problem)
    check_ids(list(chosen.logit_bias or {}), pair.target.vocab_size, "logit_bias")
    if isinstance(prompt, str):
        ids = encode(pair, prompt, chosen.max_tokens, max_context=max_context)
    else:
        ids = list(prompt)
        check_ids(ids, pair.target.vocab_size)
        check_lengths([ids], chosen.max_tokens, pair.models, "max_tokens", max_context)
    return decoder.Request(ids, chosen.max_tokens, chosen.sampling, chosen.delta, num_draft=chosen.num_draft,
                           seed=chosen.seed, stats=stats if stats is not None else decoder.Stats(),
                           logprobs=chosen.logprobs)


def steps(pair, requests, policy, batch_size=1):
    """decoder.Step records for `requests` (a list or a decoder.RequestQueue), decoded `batch_size` at a time."""
    queue = requests if isinstance(requests, decoder.RequestQueue) else decoder.RequestQueue(requests)
    return decoder.speculative_steps(pair.target, pair.drafter(), queue, None, policy, batch_size=batch_size)


def stream_generation(pair, prompt, chosen, stats=None):
    """Yield (new text, Generation) per step of one prompt until it is done."""
    one = request(pair, prompt, chosen, stats)
    generation = Generation(pair.tokenizer, pair.target.eos_token_ids, chosen.stop, one.stats)
    chosen_policy = pair.policy(chosen.schedule, chosen.num_draft)
    for step in steps(pair, [one], chosen_policy):
        yield generation.add(step), generation
        if generation.finish_reason:
            pair.remember(chosen_policy)
            return


def stream(pair, prompt, stats=None, **values):
    """Yield the text of `prompt`'s continuation in whole characters as it is decided.

    values: Settings' fields (max_tokens, temperature, top_k, top_p, seed, stop, delta,
    num_draft, schedule). stats: a decoder.Stats to fill in. Raises UsageError.
    """
    for piece, _ in stream_generation(pair, prompt, settings(**values), stats):
        if piece:
            yield piece


def generate(pair, prompt, **values):
    """The Completion of `prompt` (text, token ids, finish_reason, stats); values as for `stream`."""
    stats = decoder.Stats()
    text, generation = "", None
    for piece, generation in stream_generation(pair, prompt, settings(**values), stats):
        text += piece
    return Completion(text, generation.tokens, generation.finish_reason, stats, generation.logprobs)
