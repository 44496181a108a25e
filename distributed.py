"""Several processes or machines under `mlx.launch`: prompts shared out, or a target pipelined.

    mlx.launch -n 2 --backend ring -- python main.py --prompt-file prompts.jsonl ...
    mlx.launch --hostfile hosts.json -- python main.py --pipeline ...

Data parallel: every rank loads both models and decodes every size-th prompt; rank 0
gathers the results and prints them all in input order (`share`, `gathered`).

Pipeline: the target's layer stack (models.base.Part) is cut into contiguous runs, one
per rank, balanced by parameter bytes (`split`); each rank loads only its run's tensors.
Rank 0 holds the embedding, the draft, the step policy and acceptance; its
`PipelinedTarget` is a decoder.LanguageModel whose passes run along the ring: rank r
sends a command header and its activations (batch, n, d_model) to rank r + 1, and the
last rank sends float32 logits (batch, n, vocab) back to rank 0. The other ranks `serve`:
they follow rank 0's commands (start, decode, trim, replace_rows, keep_rows, stop) on
caches of their own layers. MLX's ring backend sends only to a rank's two neighbours,
hence the ring.

Failure: each rank runs a watchdog process (`watch`) that beats over TCP with rank 0's
watchdog. A rank that exits, is killed or goes silent for HEARTBEAT_TIMEOUT seconds ends
the job: one `error: rank R ...` line, and every other rank is killed (never a hang in a
collective, which MLX's ring backend could otherwise wait on forever). Ranks that do not
all connect within CONNECT_TIMEOUT seconds end the same way.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import decoder
import model
import synthetic
from models.base import Part

CONNECT_TIMEOUT = float(os.environ.get("MLX_SPEC_CONNECT_TIMEOUT", 60))
HEARTBEAT_TIMEOUT = float(os.environ.get("MLX_SPEC_HEARTBEAT_TIMEOUT", 20))
BEAT = 1.0  # seconds between heartbeats


# ----- the group and its watchdog ------------------------------------------------------------


def launched():
    """Whether this process was started as one rank of several (mlx.launch or mpirun)."""
    return any(name in os.environ for name in ("MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "MLX_JACCL_COORDINATOR"))


class Group:
    """This process's place among the ranks: `rank`, `size` and MLX's group (None when alone).

    Group(False) is one process alone; Group(True) joins the ranks mlx.launch started.
    """

    rank, size, mx_group, watchdog = 0, 1, None, None

    def __init__(self, launch=False):
        if not launch:
            return
        self.watchdog = Watchdog(int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0))))
        # MLX's init holds the GIL while it connects (and waits forever for a rank that never
        # comes): the watchdog is a process of its own for that reason.
        self.mx_group = mx.distributed.init(strict=True)
        self.rank, self.size = self.mx_group.rank(), self.mx_group.size()
        self.watchdog.connect(self)
        addresses = host_addresses()
        if addresses.count(addresses[self.rank] if self.rank < len(addresses) else None) > 1:
            # Ranks that share a machine take turns (pipeline) or share its cores: MKL's
            # threads must not spin for 200 ms after each product, taking a core from the
            # other rank (a tiny pipeline's pass fell from ~400 to ~7 ms on 2 cores).
            os.environ.setdefault("KMP_BLOCKTIME", "0")
        if self.rank > 0:
            # Only rank 0 writes results; the others' prints (and stray output) go nowhere.
            sys.stdout = open(os.devnull, "w")

    def close(self):
        """Tell the other ranks' watchdogs that this rank ended normally (call it on success only:
        a rank that exits without it counts as failed)."""
        if self.watchdog is not None:
            self.watchdog.done()
            self.watchdog = None

    def all_gather_bytes(self, data):
        """[bytes of rank 0, ..., bytes of rank size - 1]: each rank's `data`, on every rank."""
        sizes = mx.distributed.all_gather(mx.array([len(data)], mx.int32), group=self.mx_group).tolist()
        padded = np.zeros(max(sizes), np.uint8)
        padded[: len(data)] = np.frombuffer(data, np.uint8)
        gathered = np.array(mx.distributed.all_gather(mx.array(padded), group=self.mx_group))
        rows = gathered.reshape(self.size, max(sizes))
        return [row[:n].tobytes() for row, n in zip(rows, sizes)]


ALONE = Group()
_group = None


def init():
    """This process's Group (size 1 outside mlx.launch), set up once."""
    global _group
    if _group is None:
        _group = Group(launched())
    return _group


def ring_failure(error):
    """Whether `error` is MLX's ring backend losing a peer (the watchdog will say which)."""
    return isinstance(error, RuntimeError) and "[ring]" in str(error)


def await_watchdog(group):
    """After a lost connection: give the watchdog time to name the rank and end this one; else say so."""
    deadline = time.monotonic() + HEARTBEAT_TIMEOUT + 5 * BEAT
    while time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"error: rank {group.rank} lost its connection to another rank", file=sys.stderr, flush=True)
    os._exit(1)


class Watchdog:
    """The handle on this rank's watchdog process (see `watch`)."""

    def __init__(self, rank):
        self.rank = rank
        quiet_ring_messages()
        command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                   f"import distributed; distributed.watch({rank}, {CONNECT_TIMEOUT}, {HEARTBEAT_TIMEOUT})"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=STDERR, text=True)
        self.lock = threading.Lock()

    def tell(self, line):
        with self.lock:  # the beat thread and the main thread both speak
            try:
                self.process.stdin.write(line + "\n")
                self.process.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass

    def connect(self, group):
        """Once MLX is connected: point every watchdog at rank 0's."""
        # Read only now: the watchdog starts up while MLX connects.
        port = self.process.stdout.readline().split()[1]  # rank 0's listens; the others' say 0
        # Rank 0's address: the ring's hostfile names it; other backends (MPI, JACCL) have none.
        address = (host_addresses() or [socket.gethostname()])[0]
        leader = group.all_gather_bytes(f"{address} {port}".encode())[0].decode()
        self.tell(f"ranks {group.size}" if group.rank == 0 else f"peer {leader}")
        threading.Thread(target=self.beat, daemon=True).start()

    def beat(self):
        """Tell the watchdog, every BEAT seconds, that this process still runs (not stopped, not hung)."""
        while self.process.poll() is None:
            self.tell("alive")
            time.sleep(BEAT)

    def done(self):
        self.tell("done")
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def host_addresses():
    """Each rank's IP address, from the ring backend's hostfile ([] without one)."""
    try:
        hosts = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
        return [entries[0].rsplit(":", 1)[0] for entries in hosts]
    except (KeyError, OSError, ValueError, IndexError, TypeError, AttributeError):
        return []


STDERR = sys.stderr.fileno()


def quiet_ring_messages():
    """Drop the ring backend's own lines ("[ring] Socket 4 was closed by the peer", many a time)
    from this process's stderr; the watchdog says what happened, in one line."""
    global STDERR
    STDERR = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def forward():
        with os.fdopen(read, "rb") as lines, os.fdopen(os.dup(STDERR), "wb", buffering=0) as out:
            for line in lines:
                if not line.startswith(b"[ring]"):
                    out.write(line)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()

    def restore():
        sys.stderr.flush()
        os.dup2(STDERR, 2)  # closes the pipe's last writer: the thread sees the end and stops
        thread.join(timeout=2)

    atexit.register(restore)


def watch(rank, connect_timeout, heartbeat_timeout):
    """The watchdog process of rank `rank` (its parent): ends the job when a rank fails.

    Rank 0's watchdog listens for the others' and prints its port; the parent then says
    `ranks N` (rank 0) or `peer HOST PORT`, and `done` when it ends normally. Every
    connection carries `beat` lines, `bye` on a normal end and, from rank 0, `abort`.
    A connection that closes without `bye` or stays silent too long is a failed rank.
    """
    Watch(rank, connect_timeout, heartbeat_timeout).run()


class Peer:
    """The other end of one watchdog connection."""

    def __init__(self, sock, rank=None):
        self.sock, self.rank, self.heard, self.buffer, self.bye = sock, rank, time.monotonic(), b"", False

    def say(self, line):
        try:
            self.sock.sendall(line.encode() + b"\n")
        except OSError:
            pass  # its end shows up as a closed connection


class Watch:
    """The state of one watchdog process (see `watch`)."""

    def __init__(self, rank, connect_timeout, heartbeat_timeout):
        self.rank, self.parent = rank, os.getppid()
        self.connect_timeout, self.heartbeat_timeout = connect_timeout, heartbeat_timeout
        self.listener = socket.create_server(("", 0)) if rank == 0 else None
        print(f"port {self.listener.getsockname()[1] if self.listener else 0}", flush=True)
        self.peers, self.expected, self.began, self.pending = {}, None, time.monotonic(), b""
        self.parent_heard = None  # when the parent last said `alive`

    def fail(self, culprit, why):
        """Say which rank failed (None: rank 0 already did), stop the other ranks, kill the parent, end."""
        if culprit is not None:
            print(f"error: rank {culprit} {why}", file=sys.stderr, flush=True)
        for peer in self.peers.values():
            peer.say("abort")
        try:
            os.kill(self.parent, signal.SIGKILL)
        except OSError:
            pass
        os._exit(1)

    def from_parent(self):
        data = os.read(0, 4096)
        if not data:  # the parent ended without `done`: the peers see the connection close
            os._exit(0)
        *lines, self.pending = (self.pending + data).split(b"\n")
        for word, *rest in (line.decode().split() for line in lines):
            if word == "alive":
                self.parent_heard = time.monotonic()
            elif word == "done":
                self.leave()
            elif word == "ranks":
                self.expected = int(rest[0]) - 1
            elif word == "peer":
                try:
                    sock = socket.create_connection((rest[0], int(rest[1])), timeout=self.connect_timeout)
                except OSError:
                    self.fail(0, f"cannot be reached at {rest[0]}:{rest[1]} (its watchdog)")
                self.peers[sock] = Peer(sock, 0)
                self.peers[sock].say(f"rank {self.rank}")
                self.expected = 1

    def leave(self):
        """Say `bye` to every peer and end. A socket closed with unread data (their beats) resets
        the connection, which can lose the `bye`: so close only for writing, and read what the
        peers still send until they close too, for a second at most."""
        for peer in self.peers.values():
            peer.say("bye")
            try:
                peer.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        open_ = list(self.peers)
        deadline = time.monotonic() + 1.0
        while open_ and time.monotonic() < deadline:
            for sock in select.select(open_, [], [], max(0.0, deadline - time.monotonic()))[0]:
                try:
                    if not sock.recv(4096):
                        open_.remove(sock)
                except OSError:
                    open_.remove(sock)
        os._exit(0)

    def from_peer(self, peer):
        try:
            data = peer.sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            if not peer.bye:
                self.fail(peer.rank, "stopped (it exited or was killed)")
            del self.peers[peer.sock]
            return
        peer.heard = time.monotonic()
        *lines, peer.buffer = (peer.buffer + data).split(b"\n")
        for word, *rest in (line.decode().split() or [""] for line in lines):
            if word == "rank":
                peer.rank = int(rest[0])
            elif word == "bye":
                peer.bye = True
            elif word == "abort":
                self.fail(None, "")  # rank 0 has said which rank failed

    def run(self):
        while True:
            sources = [0, *self.peers] + ([self.listener] if self.listener else [])
            ready, _, _ = select.select(sources, [], [], BEAT)
            for source in ready:
                if source == 0:
                    self.from_parent()
                elif source is self.listener:
                    sock, _ = self.listener.accept()
                    self.peers[sock] = Peer(sock)
                elif source in self.peers:
                    self.from_peer(self.peers[source])
            now = time.monotonic()
            known = sum(peer.rank is not None for peer in self.peers.values())
            if self.expected is None or known < self.expected:
                if now - self.began > self.connect_timeout:
                    self.fail(self.rank, f"waited {self.connect_timeout:g} s for the other ranks to connect "
                                         f"(are they all started, and is the hostfile right?)")
                continue
            if self.parent_heard is not None and now - self.parent_heard > self.heartbeat_timeout:
                # This rank's own process is stopped or hung: end it. Rank 0 names itself; another
                # rank's end shows at rank 0 as a closed connection, which rank 0 names.
                if self.rank == 0:
                    self.fail(0, f"stopped answering (no progress for {self.heartbeat_timeout:g} s)")
                self.peers.clear()
                self.fail(None, "")
            for peer in list(self.peers.values()):
                if peer.bye:
                    continue
                peer.say("beat")
                if now - peer.heard > self.heartbeat_timeout:
                    self.fail(peer.rank, f"stopped answering (no heartbeat for {self.heartbeat_timeout:g} s)")


# ----- data parallel -------------------------------------------------------------------------


def share(count, group):
    """The prompt indices rank `group.rank` decodes: every size-th, from its rank on."""
    return range(group.rank, count, group.size)


def prompt_seed(seed, index):
    """The random seed of prompt `index`: `seed` itself for the first, so one prompt samples as
    it always did, and a prompt's sample never depends on the prompts decoded before it."""
    return (seed + index * 0x9E3779B97F4A7C15) % 2**64


def gathered(steps, stats, group):
    """decoder.Step records of every prompt, on rank 0, in input order; nothing on the others.

    steps: this rank's records (its share); stats: the Stats of every prompt, of which each
    rank fills its share. With one rank the records pass straight through (streamed);
    otherwise each rank decodes its whole share first, then rank 0 gathers them, one
    record per prompt, and fills in the others' stats.
    """
    if group.size == 1:
        return steps
    tokens = {}
    for step in steps:
        tokens.setdefault(step.index, []).extend(step.tokens)
    mine = {i: {"tokens": t, "stats": stats[i].as_dict()} for i, t in tokens.items()}
    results = {}
    for data in group.all_gather_bytes(json.dumps(mine).encode()):
        results.update({int(i): r for i, r in json.loads(data).items()})
    if group.rank > 0:
        return []
    records = []
    for i in sorted(results):
        fields = {k: v for k, v in results[i]["stats"].items() if k in decoder.Stats.__dataclass_fields__}
        stats[i].__dict__.update(fields)
        records.append(decoder.Step(i, results[i]["tokens"], 0, 0, 0, True, 0.0, 0.0))
    return records


# ----- pipeline ------------------------------------------------------------------------------


def unit_bytes(config):
    """Parameter count of each unit of the target's layer stack; embeddings count to the first, the rest to the last."""
    built = model.build(config)  # lazy: nothing is allocated
    stacks, offset = {}, 0
    for name, count in built.stack():
        stacks[name] = offset
        offset += count
    sizes = [0] * offset
    for name, p in tree_flatten(built.parameters()):
        unit = next((stacks[s] + int(name[len(s) + 1 :].split(".")[0]) for s in stacks if name.startswith(s + ".")),
                    None)
        if unit is None:
            unit = 0 if "embed" in name or name.startswith(("shared", "wte", "wpe")) else offset - 1
        sizes[unit] += p.size
    return sizes


def split(sizes, ranks):
    """Parts (models.base.Part) of a stack whose units hold `sizes` parameters: contiguous, one
    per rank, each ending where the running total comes nearest its share; ValueError past one
    rank per unit."""
    total = len(sizes)
    if ranks > total:
        raise ValueError(f"{ranks} ranks for a stack of {total} layers: at most one rank per layer")
    running = np.cumsum(sizes)
    bounds = [0]
    for r in range(1, ranks):
        end = int(np.argmin(np.abs(running - running[-1] * r / ranks))) + 1
        # Leave every rank, before and after, at least one unit.
        bounds.append(min(max(end, bounds[-1] + 1), total - (ranks - r)))
    bounds.append(total)
    return [Part(a, b, total) for a, b in zip(bounds, bounds[1:])]


def parts(path, group):
    """The Part of every rank for the target in converted folder `path`; a LoadError if it has too few layers."""
    if model.folder_family(path) is model.mlxlm:
        raise model.LoadError(model.PIPELINE_REFUSAL)
    try:
        return split(unit_bytes(model.read_config(path)), group.size)
    except ValueError as error:
        raise model.LoadError(f"--pipeline: {error}") from None


def load_target(path_or_name, group, dtype=None):
    """(PipelinedTarget, tokenizer): rank 0's side of the target pipelined over `group`
    (the whole target in a group of one)."""
    path = model.resolve(path_or_name)
    if group.size == 1:
        return model.load(path, dtype)
    part, tokenizer = model.load(path, dtype, parts(path, group)[0])
    return PipelinedTarget(part, group), tokenizer


def serve_target(path_or_name, group, dtype=None):
    """Rank > 0 of a pipeline: load this rank's part of the target and serve rank 0 until it stops."""
    try:
        path = model.resolve(path_or_name)
        part = model.load_model(path, dtype, parts(path, group)[group.rank])
    except model.LoadError as error:
        raise model.LoadError(f"rank {group.rank}: {error}") from None
    serve(part, group)
    group.close()


def finish(target, group):
    """After a run that went well: stop the pipeline's serving ranks, and tell every watchdog."""
    if isinstance(target, PipelinedTarget):
        target.stop()
    group.close()


def dtype_name(dtype):
    return str(dtype).split(".")[-1]


class Link:
    """This rank's end of the ring: command headers and arrays to the next rank, from the previous one."""

    def __init__(self, group):
        self.group = group.mx_group
        self.rank, self.size = group.rank, group.size
        self.next, self.previous = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.sent = 0  # bytes this rank has sent

    def send(self, x, to=None):
        mx.eval(mx.distributed.send(x, self.next if to is None else to, group=self.group))
        self.sent += x.nbytes

    def recv(self, shape, dtype, source=None):
        return mx.distributed.recv(shape, dtype, self.previous if source is None else source, group=self.group)

    def command(self, header, x=None):
        """Send `header` (a JSON object) and then, if given, activations x to the next rank."""
        if x is not None:
            header = dict(header, shape=list(x.shape), dtype=dtype_name(x.dtype))
        data = np.frombuffer(json.dumps(header).encode(), np.uint8)
        self.send(mx.array([data.size], mx.int32))
        self.send(mx.array(data))
        if x is not None:
            self.send(x)

    def receive(self):
        """(header, activations or None) from the previous rank."""
        size = self.recv((1,), mx.int32).item()
        header = json.loads(bytes(np.array(self.recv((size,), mx.uint8))))
        x = None
        if "shape" in header:
            x = self.recv(tuple(header.pop("shape")), getattr(mx, header.pop("dtype")))
            mx.eval(x)
        return header, x


class PipelineCache:
    """Rank 0's handle on one batch's caches: its own layers' (`local`), the other ranks' by `id`."""

    def __init__(self, target, id, local):
        self.target, self.id, self.local = target, id, local
        # When rank 0 drops a batch, the other ranks drop theirs with the next command.
        weakref.finalize(self, target.released.append, id)

    def trim(self, counts):
        self.local.trim(counts)
        self.target.command({"op": "trim", "id": self.id, "counts": np.asarray(counts).tolist()})

    def replace_rows(self, rows, fresh):
        self.local.replace_rows(rows, fresh.local)
        self.target.command({"op": "replace_rows", "id": self.id, "rows": list(rows), "fresh": fresh.id})

    def keep_rows(self, rows):
        self.local.keep_rows(rows)
        self.target.command({"op": "keep_rows", "id": self.id, "rows": list(rows)})


class PipelinedTarget:
    """A decoder.LanguageModel whose passes run across the ranks: rank 0's side of the pipeline.

    part: rank 0's part of the target (models.base.Part: the embedding and the first
    layers). decode(tokens (batch, n)) runs them, sends the activations (batch, n, d_model)
    on, and returns the logits (batch, n, vocab) the last rank sends back, unevaluated.
    """

    def __init__(self, part, group):
        self.part, self.link = part, Link(group)
        self.released, self.ids, self.passes = [], 0, 0

    def __getattr__(self, name):  # vocab_size, eos_token_id, max_positions, decoder_start_token_id
        return getattr(self.part, name)

    def command(self, header, x=None):
        if self.released:
            header = dict(header, free=self.released[:])
            self.released.clear()
        self.link.command(header, x)

    def start(self, prompts):
        cache, firsts, out = self.part.start_part(prompts)
        self.ids += 1
        self.command({"op": "start", "id": self.ids, "prompts": [list(map(int, p)) for p in prompts]}, out)
        return PipelineCache(self, self.ids, cache), firsts

    def prefill(self, prompts, chunk=None):
        """start() as a generator of no chunks: every rank prefills its part in one go."""
        return self.start(prompts)
        yield  # noqa: unreachable  (makes this a generator)

    def decode(self, tokens, cache, padding=None):
        x = self.part.decode(tokens, cache.local, padding)
        padding = None if padding is None else np.asarray(padding).tolist()
        self.command({"op": "decode", "id": cache.id, "padding": padding}, x)
        self.passes += 1
        return self.link.recv((*tokens.shape, self.part.vocab_size), mx.float32, source=self.link.size - 1)

    def stop(self):
        """Let the other ranks' serving loops end."""
        self.command({"op": "stop"})


def local(target):
    """The model of `target` held in this process: rank 0's part of a PipelinedTarget, or target itself."""
    return target.part if isinstance(target, PipelinedTarget) else target


def serve(part, group):
    """Rank > 0 of a pipeline: run this rank's part of every command rank 0 sends, until `stop`."""
    link, caches = Link(group), {}
    last = group.rank == group.size - 1
    while True:
        header, x = link.receive()
        for id in header.pop("free", []):
            caches.pop(id, None)
        op, out = header["op"], None
        if op == "start":
            caches[header["id"]], _, out = part.start_part(header["prompts"], x)
        elif op == "decode":
            padding = header["padding"]
            out = part.decode(x, caches[header["id"]], None if padding is None else np.array(padding))
        elif op == "trim":
            caches[header["id"]].trim(header["counts"])
        elif op == "replace_rows":
            caches[header["id"]].replace_rows(header["rows"], caches.pop(header["fresh"]))
        elif op == "keep_rows":
            caches[header["id"]].keep_rows(header["rows"])
        if last:
            if op == "decode":
                link.send(out.astype(mx.float32), to=0)
        else:
            link.command(header, out)
        if op == "stop":
            return


# ----- memory per rank -----------------------------------------------------------------------

# DeepSeek-Coder 33B (Llama-shaped) and the 1.3B model that drafts for it, from their config.json.
DEEPSEEK_CODER = dict(model_type="llama", vocab_size=32256, num_attention_heads=56, num_key_value_heads=8,
                      rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0}, tie_word_embeddings=False)
CHECKPOINTS = {
    "t5-11b": (lambda: synthetic.real_config("t5-11b"), lambda: synthetic.real_config("t5-small")),
    "deepseek-coder-33b": (
        lambda: dict(DEEPSEEK_CODER, hidden_size=7168, intermediate_size=19200, num_hidden_layers=62),
        lambda: dict(DEEPSEEK_CODER, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                     num_attention_heads=16, num_key_value_heads=16)),
}


def memory_table(ranks=(1, 2, 4)):
    """README's table: GB of target weights on the fullest rank when T5-11B or DeepSeek-Coder 33B
    is pipelined over `ranks` ranks, per weight format, and what the draft adds on rank 0."""
    formats = synthetic.FORMATS
    lines = ["| target | ranks | " + " | ".join(name for name, _, _ in formats) + " |", "|---" * (2 + len(formats)) + "|"]
    drafts = []
    for name, (target, draft) in CHECKPOINTS.items():
        config, sizes = target(), unit_bytes(target())
        for n in ranks:
            fullest = [max(model.weight_bytes(config, b, q, part) for part in split(sizes, n)) for _, b, q in formats]
            lines.append(f"| {name} | {n} | " + " | ".join(f"{size / 1e9:.1f} GB" for size in fullest) + " |")
        drafts.append(f"| {name}'s draft (rank 0) | | "
                      + " | ".join(f"{model.weight_bytes(draft(), b, q) / 1e9:.2f} GB" for _, b, q in formats) + " |")
    return "\n".join(lines + drafts)
