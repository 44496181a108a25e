"""The server's batching engine: one thread owns MLX and decodes every submitted request in one batch
(continuous batching), each request with its own api.Settings and its own listener.

    engine = Engine(api.load(target, draft), max_batch=8)
    index = engine.submit(ids, api.Settings(max_tokens=64), listener)   # listener(Event) on the engine's thread
    engine.cancel(index)     # a client went away
    engine.close(); engine.join()
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import dataclasses
import threading
from dataclasses import dataclass

import mlx.core as mx

import decoder
from api import Generation, request


class QueueFull(RuntimeError):
    """The engine's queue of waiting requests is full."""


@dataclass
class Event:
    """What the engine tells a request's listener after a step: new text (maybe none), and when done
    the finish reason; step: the decoder.Step record it came from (None for an event of no step)."""

    text: str
    finish_reason: str = None
    stats: decoder.Stats = None
    error: str = None
    step: decoder.Step = None
    logprobs: list = None  # the entries of tokens not told of before (Generation.new_logprobs), if asked


class Guarded:
    """A model as the engine's batch sees it: a prompt whose prefill fails fails its own request only.

    When starting several prompts at once fails, each is started alone; those that fail
    alone are reported to `failed(ids, error)` and replaced by a one-token stand-in (their
    request is cancelled, so its row leaves before the next step). `started(prompts)` hears
    of every prompt taken from the queue. Everything else is the model's own.
    """

    def __init__(self, model, failed, started=lambda prompts: None):
        self.model, self.failed, self.started = model, failed, started

    def __getattr__(self, name):
        return getattr(self.model, name)

    def start(self, prompts):
        self.started(prompts)
        try:
            return self.model.start(prompts)
        except Exception:  # noqa: BLE001  (find the prompt at fault; a second failure fails the batch)
            kept = []
            for ids in prompts:
                try:
                    self.model.start([ids])
                    kept.append(ids)
                except Exception as error:  # noqa: BLE001
                    self.failed(ids, error)
                    kept.append([0])
            return self.model.start(kept)

    def prefill(self, prompts, chunk=None):
        """The model's prefill generator; if it fails, its prompts fail and stand-ins start."""
        self.started(prompts)
        try:
            return (yield from self.model.prefill(prompts, chunk))
        except Exception as error:  # noqa: BLE001
            for ids in prompts:
                self.failed(ids, error)
            return self.model.start([[0]] * len(prompts))


class Engine:
    """Continuous batching: one thread owns MLX and decodes every submitted request in one batch.

    A request joins the running batch at the next step, keeps its own Settings, and leaves
    it when done, stopped or cancelled. Its listener is called on the engine's thread with
    an Event after every step that gives it tokens (the text they complete, maybe none), the
    last one with its finish reason (or its error: a fault inside one request ends that
    request; one the batch shares ends the requests decoding in it, never those still
    waiting, nor the engine).
    max_context: a limit in tokens below the models' own (see context_limits), or None.
    """

    def __init__(self, pair, max_batch=8, max_queue=64, num_draft=5, schedule="adaptive", log=None,
                 max_context=None):
        self.pair, self.max_batch, self.max_queue, self.num_draft = pair, max_batch, max_queue, num_draft
        self.max_context = max_context
        self.policy = pair.policy(schedule, num_draft, range(1, max_batch + 1))
        self.queue = decoder.RequestQueue()
        self.open = {}  # request index -> (Generation, listener, Stats)
        self.indices = {}  # id() of a request's token list -> its index, to name a prompt that fails
        self.decoding = set()  # indices taken from the queue into the batch
        self.lock = threading.RLock()  # close() may run in a signal handler while this thread holds it
        self.closed = False
        self.log = log or (lambda message: None)
        self.thread = threading.Thread(target=self.run, name="mlx-engine", daemon=True)
        self.thread.start()

    def submit(self, ids, chosen, listener):
        """Queue token ids `ids` with Settings `chosen`; return the request's index.

        Raises UsageError for a request that cannot run (bad settings or ids, past the
        context), QueueFull when the queue is full or the engine closed.
        """
        one = request(self.pair, ids, chosen, max_context=self.max_context)
        with self.lock:
            if self.closed or len(self.queue) >= self.max_queue:
                raise QueueFull("the server is shutting down" if self.closed else
                                f"{len(self.queue)} requests are waiting; try again later")
            one.num_draft = min(chosen.num_draft, self.num_draft)
            generation = Generation(self.pair.tokenizer, self.pair.target.eos_token_ids, chosen.stop, one.stats)
            index = self.queue.put(one)
            self.open[index] = (generation, listener, one.stats)
            self.indices[id(one.ids)] = index
            return index

    def cancel(self, index):
        """Drop request `index` (a client went away); nothing more is sent to its listener."""
        self.end(index)

    def end(self, index, event=None, leave=True):
        """Take request `index` out of the engine (out of the batch too, with `leave`); tell its listener `event`."""
        with self.lock:
            entry = self.open.pop(index, None)
            self.decoding.discard(index)
            self.indices = {key: i for key, i in self.indices.items() if i != index}
        if entry is None:
            return
        if leave:
            self.queue.cancel(index)
        if event is not None:
            self.tell(entry[1], dataclasses.replace(event, stats=entry[2]))

    def tell(self, listener, event):
        """Call a listener; one that fails (its client's loop is gone) harms no other request."""
        try:
            listener(event)
        except Exception as error:  # noqa: BLE001
            self.log(f"a listener failed: {type(error).__name__}: {error}")

    def close(self):
        """Admit nothing more; end every open request with finish reason "abort". See join()."""
        with self.lock:
            self.closed = True
            ending = list(self.open)
        for index in ending:
            self.end(index, Event("", "abort"))

    def join(self, timeout=None):
        """After close(): wait for the engine's thread to leave MLX (a process must not exit while it runs)."""
        self.thread.join(timeout)

    def failed_prompt(self, ids, error):
        """A request whose own prefill failed (Guarded): end it with the error."""
        index = self.indices.get(id(ids))
        self.log(f"request {index} failed: {type(error).__name__}: {error}")
        if index is not None:
            self.end(index, Event("", None, error=f"decoding failed: {error}"))

    def started(self, prompts):
        with self.lock:
            self.decoding.update(self.indices[id(ids)] for ids in prompts if id(ids) in self.indices)

    def steps(self):
        """The step loop's records over the queue, its models Guarded."""
        target = Guarded(self.pair.target, self.failed_prompt, self.started)
        drafter = (self.pair.drafter() if self.pair.draft is None
                   else decoder.as_drafter(Guarded(self.pair.draft, self.failed_prompt)))
        return decoder.speculative_steps(target, drafter, self.queue, None, self.policy, batch_size=self.max_batch)

    def run(self):
        try:
            self.serve()
            self.pair.remember(self.policy, range(1, self.max_batch + 1))
        finally:
            # MLX asks a thread to destroy its own streams before it ends: left to thread and
            # process teardown, they now and then abort the process ("terminate called").
            mx.clear_streams()

    def serve(self):
        """Decode what the queue holds, batch after batch, until close()."""
        while not self.closed:
            if not self.queue.wait(timeout=0.2):
                continue
            try:
                for step in self.steps():
                    self.deliver(step)
                    if self.closed:
                        break
            except Exception as error:  # noqa: BLE001  (the engine must outlive one bad batch)
                self.log(f"decoding failed: {type(error).__name__}: {error}")
                with self.lock:
                    failed = list(self.decoding)
                for index in failed:
                    self.end(index, Event("", None, error=f"decoding failed: {error}"))

    def deliver(self, step):
        """Hand one Step record's text to its request; a request done by a stop string leaves the batch."""
        with self.lock:
            entry = self.open.get(step.index)
        if entry is None:
            return
        generation, listener, stats = entry
        piece = generation.add(step)
        logprobs = generation.new_logprobs()
        if generation.finish_reason:
            self.end(step.index, Event(piece, generation.finish_reason, step=step, logprobs=logprobs),
                     leave=not step.finished)
        else:
            self.tell(listener, Event(piece, None, stats, step=step, logprobs=logprobs))
