"""Step costs calibrated once per machine and kept: what the adaptive schedule starts from.

`measure` times the components of a speculative step on purpose (the draft's one-token
call, the target's pass over 1 .. cap + 1 tokens per row, the loop's host work), with
a device synchronisation around each call, taking the calls in turns so that a drift
of the machine hits every row count alike. The costs are kept in a small JSON file,
`step-costs.json` under the user's cache folder (`$XDG_CACHE_HOME/mlx-speculative/`,
by default `~/.cache/mlx-speculative/`; `MLX_T5_STEP_COSTS` names another file), one
entry per machine (processor, device, BLAS), MLX version, target, draft, dtype and
batch size. A run finds its entry and starts from it (`adaptive_policy`), and writes
back what it measured (`remember`): the costs rescaled to the steps it timed, and the
pooled acceptance of its drafts. An entry of another machine or MLX version never
matches; a damaged file is ignored with one warning on stderr, and replaced at the
next write. Writers take an exclusive lock and replace the file atomically.
"""

import cpu_blas  # noqa: I001  (binds MKL or OpenBLAS before MLX loads on Linux)

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

import decoder
import files
import model
import policy

try:
    import fcntl
except ImportError:  # not on Windows: writers then go without the lock
    fcntl = None

# The tokens the caches hold while calls are timed: about the middle of a short generation.
CONTEXT = 64
# A stored acceptance counts as at most this many judged drafts, so a run's own take over quickly.
ACCEPTANCE_WEIGHT = 32.0
_warned = set()


def path():
    """The file the costs are kept in."""
    if os.environ.get("MLX_T5_STEP_COSTS"):
        return Path(os.environ["MLX_T5_STEP_COSTS"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mlx-speculative" / "step-costs.json"


def processor():
    """The processor's model name, e.g. 'AMD EPYC 7B13' (what /proc/cpuinfo or MLX says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """What a measured cost depends on besides the models: processor, device, BLAS, MLX version."""
    device = mx.default_device()
    name = mx.device_info().get("device_name", "") if device == mx.gpu else processor()
    return dict(processor=name, platform=f"{platform.system()} {platform.machine()}", device=str(device),
                blas=cpu_blas.LOADED, mlx=mx.__version__)


def fingerprint(folder):
    """What identifies a converted model whatever folder holds it: a hash of its config.json and of its
    weight files' names and sizes (a copied, moved or re-downloaded folder keeps it; new weights change it)."""
    folder = model.resolve(folder).resolve()
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in model.weight_files(folder):
        digest.update(f"\0{Path(weights).name}\0{Path(weights).stat().st_size}".encode())
    return digest.hexdigest()[:32]


def identity(target, draft, batch, dtype=None):
    """The fields an entry is found by: this machine, the two models' contents (`fingerprint`), dtype and
    batch size."""
    dtype = str(dtype or model.default_dtype()).replace("mlx.core.", "")
    return dict(machine(), target=fingerprint(target), draft=fingerprint(draft), dtype=dtype, batch=int(batch))


def entry_key(fields):
    return json.dumps([fields[name] for name in sorted(fields)])


def warn_once(file, reason, what="the step-cost file"):
    """Print `warning: ignoring <what> <file> (<reason>)` on stderr, once per file and kind of warning."""
    if (file, what) not in _warned:
        _warned.add((file, what))
        print(f"warning: ignoring {what} {file} ({reason})", file=sys.stderr)


def read(file=None):
    """{key: entry} held in the file; {} when there is none, or (with one warning) when it is damaged."""
    file = Path(file or path())
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))["entries"]
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise ValueError("entries are not objects")
        return entries
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        warn_once(str(file), f"{type(error).__name__}: {error}".splitlines()[0])
        return {}


# What a machine can measure: a call takes at least a microsecond and less than ten minutes.
MEASURABLE = (1e-6, 600.0)


def components(entry):
    """policy.Components of a stored entry, or None if the entry does not hold costs a machine could
    have measured (missing, not numbers, negative, NaN or absurd, a pass of zero seconds)."""
    try:
        costs = policy.Components(float(entry["host"]), float(entry["draft_seconds"]),
                                  {int(rows): float(s) for rows, s in entry["verify"].items()})
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    low, high = MEASURABLE
    # host and draft may be 0: costs a run took from its own whole steps fold them into the passes.
    valid = (all(math.isfinite(v) and low <= v <= high for v in costs.verify.values())
             and all(math.isfinite(v) and 0 <= v <= high for v in (costs.host, costs.draft))
             and min(costs.verify) >= 1)
    return costs if valid else None


def lookup(fields, file=None):
    """The stored entry for these identity fields, or None (none stored, or, with one warning, not valid)."""
    entry = read(file).get(entry_key(fields))
    if entry is None:
        return None
    if components(entry) is None:
        warn_once(str(file or path()), "zero, negative, not a number or beyond ten minutes: no machine measures "
                  "that; main.py --calibrate measures them again", "the kept step costs of these models in")
        return None
    return entry


def update(fields, change, file=None):
    """Apply change(entry or None) -> entry to the entry for these fields, under an exclusive lock.

    The file is read, changed and replaced atomically while the lock is held, so
    concurrent writers (several runs ending at once) each see the others' entries.
    """
    file = Path(file or path())
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{file}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        entries = read(file)
        key = entry_key(fields)
        entries[key] = dict(change(entries.get(key)), **fields)
        files.write_atomically(file, "w", lambda f: json.dump(dict(entries=entries), f, indent=1))


def store(fields, costs, acceptance=None, file=None):
    """Keep `costs` (policy.Components) and a pooled [accepted, judged] for these identity fields."""
    def change(old):
        kept = acceptance if acceptance is not None else (old or {}).get("acceptance")
        return dict(host=costs.host, draft_seconds=costs.draft,
                    verify={str(rows): seconds for rows, seconds in sorted(costs.verify.items())},
                    acceptance=kept, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    update(fields, change, file)


def timed(run):
    """Seconds of run(), evaluated (a synchronisation before and after)."""
    mx.synchronize()
    began = time.perf_counter()
    mx.eval(run())
    return time.perf_counter() - began


def warmed_cache(m, prompt_ids, batch, context):
    """A cache of `batch` copies of the prompt, holding `context` more tokens."""
    cache, _ = m.start([list(prompt_ids)] * batch)
    mx.eval(m.decode(mx.zeros((batch, context), mx.int32), cache))
    return cache


def decode_time(m, cache, batch, tokens):
    """Seconds of one decode call over `tokens` new tokens per row; the cache is trimmed back."""
    seconds = timed(lambda: m.decode(mx.zeros((batch, tokens), mx.int32), cache))
    cache.trim(tokens)
    return seconds


def host_time(target, draft, prompt_ids, batch, steps=12):
    """Median seconds of the loop's own work per step, timed inside the loop (k 1 steps)."""
    records = decoder.speculative_steps(target, decoder.as_drafter(draft), [list(prompt_ids)] * batch, steps,
                                        policy.ConstantPolicy(1), batch_size=batch)
    return statistics.median(record.host_seconds for record in records)


def measure(target, draft, prompt_ids, most, batch=1, calls=9, context=CONTEXT):
    """policy.Components measured on purpose: draft seconds per token, the target's pass over
    1 .. most + 1 tokens per row (rows = tokens x batch; at a batch size above 1 also one row's
    passes, so that the curve reaches down to 1 row for the batch's last prompts), host seconds
    per step.

    Each round times one call of every kind (a warm-up round first); medians are kept.
    """
    sizes = sorted({1, batch})
    target_caches = {size: warmed_cache(target, prompt_ids, size, context) for size in sizes}
    draft_cache = warmed_cache(draft, prompt_ids, batch, context)
    shapes = [(size, n) for size in sizes for n in range(1, most + 2)]
    draft_times, verify_times = [], {shape: [] for shape in shapes}
    for round_ in range(calls + 1):
        draft_seconds = decode_time(draft, draft_cache, batch, 1)
        passes = {(size, n): decode_time(target, target_caches[size], size, n) for size, n in shapes}
        if round_:  # round 0 warms every shape up
            draft_times.append(draft_seconds)
            for shape in shapes:
                verify_times[shape].append(passes[shape])
    by_rows = {}
    for (size, n), times in verify_times.items():
        by_rows.setdefault(size * n, []).append(statistics.median(times))
    verify = {rows: statistics.mean(medians) for rows, medians in by_rows.items()}
    return policy.Components(host_time(target, draft, prompt_ids, batch), statistics.median(draft_times), verify)


def adaptive_policy(num_draft, fields, file=None, batches=None):
    """An AdaptivePolicy that starts from the stored entries for `fields` at each batch size in
    `batches` (default: fields' own; a server's batch grows and shrinks), uncalibrated where none is
    stored, with the pooled acceptance of the first entry found."""
    costs, pooled = {}, None
    for batch in batches or [fields["batch"]]:
        entry = lookup(dict(fields, batch=batch), file)
        if entry is None:
            continue
        costs[batch] = components(entry)
        found = entry.get("acceptance")
        if pooled is None and isinstance(found, list) and len(found) == 2 and 0 <= found[0] <= found[1]:
            pooled = scaled_acceptance(found)
    return policy.AdaptivePolicy(num_draft, policy.StepCosts(costs), pooled)


def starting_from(num_draft, batch, costs, pooled=None):
    """An AdaptivePolicy that knows the step costs (policy.Components) at `batch` and a pooled acceptance."""
    return policy.AdaptivePolicy(num_draft, policy.StepCosts({batch: costs}), pooled)


def scaled_acceptance(pooled):
    """[accepted, judged] with the same ratio, counting as ACCEPTANCE_WEIGHT judged drafts at most."""
    factor = min(1.0, ACCEPTANCE_WEIGHT / pooled[1]) if pooled[1] else 1.0
    return [pooled[0] * factor, pooled[1] * factor]


def learned(chosen, batch):
    """(costs, pooled acceptance) worth keeping from an adaptive run: its batch size's costs as it
    measured them (calibrated there, or from its own steps; None if it timed too few) and its
    acceptance (None if it judged no draft)."""
    costs = None
    if isinstance(chosen, policy.AdaptivePolicy):
        costs = chosen.costs.calibration(batch) or chosen.costs.measured(batch)
    pooled = getattr(chosen, "pooled", [0, 0])
    return costs, (scaled_acceptance(pooled) if pooled[1] else None)


def remember_over(chosen, fields, batches, file=None):
    """remember() at every batch size in `batches`; the batch sizes written."""
    return [batch for batch in batches if remember(chosen, dict(fields, batch=batch), file)]


def remember(chosen, fields, file=None):
    """Write back what an adaptive run measured at its batch size, calibrated there or not: the costs
    as it measured them, and its pooled acceptance. Returns whether it wrote."""
    costs, pooled = learned(chosen, fields["batch"])
    if costs is None:
        return False
    try:
        store(fields, costs, pooled, file)
    except OSError as error:  # the run itself went well: say so, and go on
        print(f"warning: the step costs were not kept in {file or path()}: {error.strerror or error}", file=sys.stderr)
        return False
    return True


def describe(costs, batch):
    """A short table of measured costs: per k, the target's rows and pass, and the whole step."""
    one = costs.verify_at(batch)
    lines = [f"draft {costs.draft * 1e3:.2f} ms per token, host {costs.host * 1e3:.2f} ms per step, batch {batch}",
             "| k | target rows | target pass ms (fitted) | x k 0's pass | step ms |", "|---|---|---|---|---|"]
    for k in range(max(costs.verify) // batch):
        rows = (k + 1) * batch
        if rows not in costs.verify:
            continue
        lines.append(f"| {k} | {rows} | {costs.verify[rows] * 1e3:.2f} ({costs.verify_at(rows) * 1e3:.2f}) | "
                     f"{costs.verify_at(rows) / one:.2f} | {costs.step(batch, k) * 1e3:.2f} |")
    return "\n".join(lines)
