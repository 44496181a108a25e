"""The per-row slot cache of self-attention keys/values, shared by every model family."""

import mlx.core as mx
import numpy as np

# Logical position of a cache slot that must never be attended to: it lies in the
# future of every query, so the causal rule masks it.
HIDDEN_POSITION = 2**30


class Cache:
    """Self-attention state for one batch of prompts.

    Keys/values live in buffers preallocated in steps of `step` slots; `offset` counts
    the slots in use and is shared by the batch. Each row keeps its own length (the
    number of tokens it has decoded) and the logical position of every slot, so rows
    can drop different numbers of tokens: the tail common to all rows is cut by moving
    `offset`, the rest is hidden by giving those slots HIDDEN_POSITION. Nothing is
    copied then; `compact` squeezes hidden slots out once they make up most of the cache.
    """

    step = 256
    # Hidden slots cost every later step attention time; compacting costs one copy of
    # the live ones. So compact once hidden slots outnumber live ones by this many.
    slack = 16

    def __init__(self, batch, num_layers):
        self.batch = batch
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.positions = mx.full((batch, 0), HIDDEN_POSITION, dtype=mx.int32)
        self.offset = 0
        self.write_at = 0
        self.lengths = np.zeros(batch, dtype=np.int64)

    def capacity(self, slots):
        """Buffer slots to allocate for `slots` in use: rounded up to a whole step."""
        return self.step * -(-slots // self.step)

    def _resize(self, capacity, slots=None):
        """Buffers of `capacity` slots holding the current ones' slots (or the `slots` chosen per row)."""
        used = self.offset if slots is None else slots.shape[1]
        extra = capacity - used

        def resized(buffer, fill):
            kept = buffer[..., :used, :] if slots is None else mx.take_along_axis(buffer, slots[:, None, :, None], 2)
            shape = (*buffer.shape[:2], extra, buffer.shape[3])
            return mx.concatenate([kept, mx.full(shape, fill, buffer.dtype)], axis=2)

        self.positions = resized(self.positions[:, None, :, None], HIDDEN_POSITION)[:, 0, :, 0]
        for i, keys in enumerate(self.keys):
            if keys is not None:
                self.keys[i] = resized(keys, 0)
                self.values[i] = resized(self.values[i], 0)

    def grow(self, slots):
        """Make room for `slots` more slots in use at once, so claiming them later copies nothing."""
        if self.offset + slots > self.positions.shape[1]:
            self._resize(self.capacity(self.offset + slots))

    def reserve(self, count, padding=None):
        """Claim `count` slots for new tokens; return (query, key) positions, each (batch, n).

        padding (batch,) says how many of each row's new tokens are leading filler:
        their slots are hidden and they do not count towards the row's length.
        """
        padding = np.zeros(self.batch, dtype=np.int64) if padding is None else np.asarray(padding)
        self.grow(count)
        steps = np.arange(count)
        # Filler sits at HIDDEN_POSITION as key and as query: real queries never see it,
        # and it sees at least itself. A filler query that saw nothing (a row's first
        # token) would give NaN, which its keys/values would pass on to every layer after.
        real = self.lengths[:, None] - padding[:, None] + steps
        queries = np.where(steps < padding[:, None], HIDDEN_POSITION, real)
        self.positions[:, self.offset : self.offset + count] = mx.array(queries, dtype=mx.int32)
        self.write_at = self.offset
        self.offset += count
        self.lengths = self.lengths + count - padding
        return mx.array(queries, dtype=mx.int32), self.positions[:, : self.offset]

    def _allocate(self, index, keys, values):
        """Buffers for layer `index`, allocated on first use, when its heads, width and dtype are known."""
        shape = (self.batch, keys.shape[1], self.positions.shape[1], keys.shape[3])
        self.keys[index], self.values[index] = mx.zeros(shape, keys.dtype), mx.zeros(shape, values.dtype)

    def store(self, index, keys, values):
        """Write one layer's new keys/values (batch, heads, n, dim) at the claimed slots; return all in use."""
        if self.keys[index] is None:
            self._allocate(index, keys, values)
        self.keys[index][..., self.write_at : self.offset, :] = keys
        self.values[index][..., self.write_at : self.offset, :] = values
        return self.keys[index][..., : self.offset, :], self.values[index][..., : self.offset, :]

    def trim(self, counts):
        """Forget the last `counts` tokens: one int for every row, or one per row."""
        counts = np.broadcast_to(np.asarray(counts, dtype=np.int64), self.lengths.shape)
        common = int(counts.min())
        self.offset -= common
        self.lengths = self.lengths - counts
        if (counts > common).any():
            first_hidden = mx.array(self.offset - (counts - common), dtype=mx.int32)[:, None]
            slots = mx.arange(self.offset, dtype=mx.int32)[None]
            window = self.positions[:, : self.offset]
            self.positions[:, : self.offset] = mx.where(slots >= first_hidden, HIDDEN_POSITION, window)
        if self.offset > 2 * self.lengths.max() + self.slack:
            self.compact()

    def compact(self):
        """Move each row's live slots to the front, in order, so hidden ones stop costing."""
        positions = np.array(self.positions[:, : self.offset])
        width = int(self.lengths.max())
        slots = np.zeros((self.batch, width), dtype=np.int64)
        for row, live in enumerate(positions != HIDDEN_POSITION):
            found = np.flatnonzero(live)
            slots[row, : len(found)] = found
        # width + 1: room for the next token, so the next step does not grow it again at once.
        self._resize(self.capacity(width + 1), mx.array(slots))
        # Rows shorter than the widest were filled with copies of slot 0: hide those.
        filler = np.arange(width)[None] >= self.lengths[:, None]
        self.positions[:, :width] = mx.where(mx.array(filler), HIDDEN_POSITION, self.positions[:, :width])
        self.offset = width

    def replace_rows(self, rows, fresh):
        """Put the prompts of `fresh` (a new cache, one row each) in place of `rows`.

        The old slots of `rows` are hidden; whatever `fresh` already holds (a prefilled
        prompt) goes into `fresh.offset` new slots, hidden for every other row.
        """
        index, count = mx.array(rows), fresh.offset
        if self.positions.size:
            # Guarded: MLX's scatter into an array of zero size dies with SIGFPE (a row
            # replaced before the cache ever decoded, e.g. a draft that only saw k 0 steps).
            self.positions[index] = HIDDEN_POSITION
        self.lengths[np.asarray(rows)] = fresh.lengths
        if count == 0:
            return
        start = self.offset
        self.reserve(count, np.full(self.batch, count))  # new slots, hidden for every row so far
        self.positions[index, start : self.offset] = fresh.positions[:, :count]
        for layer, (keys, values) in enumerate(zip(fresh.keys, fresh.values)):
            if keys is None:
                continue
            if self.keys[layer] is None:
                self._allocate(layer, keys, values)
            self.keys[layer][index, :, start : self.offset] = keys[..., :count, :]
            self.values[layer][index, :, start : self.offset] = values[..., :count, :]
        if self.offset > 2 * self.lengths.max() + self.slack:
            self.compact()

    def keep_rows(self, rows):
        """Drop every row not in `rows`."""
        index = mx.array(rows)
        self.keys = [None if k is None else k[index] for k in self.keys]
        self.values = [None if v is None else v[index] for v in self.values]
        self.positions = self.positions[index]
        self.lengths = self.lengths[np.asarray(rows)]
        self.batch = len(rows)
