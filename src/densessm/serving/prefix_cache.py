"""The prompt-state cache: the recurrent state after a token prefix, kept for later prompts that extend it.

A recurrent model's whole history is its state, a fixed set of tensors: the state after a 2,000-token
system prompt costs the same bytes as after 20 tokens, and a later prompt that starts with the same tokens
continues from it instead of reading them again. The cache is an LRU bounded in bytes (every state of one
model has the same size, so the bound is a number of entries).

**Exact by construction.** The engine reads a prompt in slices that end at its *split points*: every
multiple of the block size, and the hints its request gives (where chat messages end). States are kept
only at split points, and an entry is keyed by the tokens before it *and* the split points before it. A
hit therefore hands over the state that the very same sequence of model calls produced, and continuing
from it runs the calls a cold read runs: a hit gives bit for bit the tokens of a miss.

Keys are BLAKE2b digests computed incrementally along the prompt (a lookup reads each token once); the
stored tokens and split points are compared on a hit, so a collision can never hand one prompt
another's state.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

State = list[dict[str, torch.Tensor]]  # per layer: name -> tensor [1, ...], as in RecurrentCache.layers


def split_points(length: int, block: int, hints: Iterable[int] = ()) -> list[int]:
    """Where the slices of a ``length``-token prompt end: each multiple of ``block`` and each hint inside the
    prompt, then ``length``."""
    inside = {h for h in hints if 0 < h < length} | set(range(block, length, block))
    return sorted(inside) + [length]


def prefix_keys(tokens: Sequence[int], splits: Sequence[int]) -> list[bytes]:
    """The key of the state at each split point: a digest of the tokens and the split points up to it."""
    digest = hashlib.blake2b(digest_size=16)
    keys, start = [], 0
    for end in splits:
        digest.update(array("q", tokens[start:end]).tobytes())
        digest.update(b"|" + end.to_bytes(8, "little"))
        keys.append(digest.copy().digest())
        start = end
    return keys


def state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for layer in state for t in layer.values())


def clone_state(state: State) -> State:
    return [{name: t.clone() for name, t in layer.items()} for layer in state]


@dataclass
class Lookup:
    """What :meth:`PrefixCache.lookup` found: the state after the first ``length`` tokens (None: a miss), the
    split points whose prefix an earlier prompt shared (worth keeping), and every split point's key."""

    length: int = 0
    state: State | None = None
    seen: set[int] = field(default_factory=set)
    keys: dict[int, bytes] = field(default_factory=dict)


@dataclass
class _Entry:
    tokens: bytes  # the prefix and its split points, compared on a hit
    state: State


def _identity(tokens: Sequence[int], splits: Sequence[int]) -> bytes:
    return array("q", tokens).tobytes() + b"|" + array("q", splits).tobytes()


class PrefixCache:
    """LRU of states at split points of token prefixes, at most ``max_bytes`` of them.

    ``state_size`` is the bytes of one state of the served model; a budget smaller than one state disables
    the cache. Keys of prefixes seen without being stored are remembered too (a few bytes each), so that a
    prefix shared by two prompts (a system prompt, a few-shot block) is stored when it is seen again.
    """

    def __init__(self, max_bytes: int, state_size: int, remembered: int = 65536):
        self.state_size = state_size
        self.capacity = max_bytes // state_size if state_size > 0 else 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._remembered = remembered
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return len(self._entries) * self.state_size

    def lookup(self, tokens: Sequence[int], splits: Sequence[int]) -> Lookup:
        """The deepest stored split point of ``tokens`` that leaves at least one token to read (with a copy of
        its state), the split points earlier lookups met, and the keys; remembers this prompt's."""
        found = Lookup()
        if not self.enabled:
            return found
        best: bytes | None = None
        for index, (end, key) in enumerate(zip(splits, prefix_keys(tokens, splits), strict=True)):
            found.keys[end] = key
            entry = self._entries.get(key)
            if end < len(tokens) and entry is not None and entry.tokens == _identity(tokens[:end], splits[: index + 1]):
                found.length, best = end, key
            if key in self._seen:
                found.seen.add(end)
            self._remember(key)
        if best is not None:
            self._entries.move_to_end(best)
            found.state = clone_state(self._entries[best].state)
        return found

    def put(self, key: bytes, tokens: Sequence[int], splits: Sequence[int], state: State) -> None:
        """Keep a copy of ``state``, the state after ``tokens`` read in slices ending at ``splits`` (the last
        is ``len(tokens)``); ``key`` is its :func:`prefix_keys` key."""
        if not self.enabled:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        while len(self._entries) >= self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1
        self._entries[key] = _Entry(_identity(tokens, splits), clone_state(state))

    def _remember(self, key: bytes) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self._remembered:
            self._seen.popitem(last=False)


__all__ = ["Lookup", "PrefixCache", "State", "clone_state", "prefix_keys", "split_points", "state_bytes"]
