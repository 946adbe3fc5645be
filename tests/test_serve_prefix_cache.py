"""The prompt-state cache on its own: the deepest stored split point, keyed by tokens and split points, a copy
per hit, LRU bounded in bytes."""

from __future__ import annotations

import torch

from densessm.serving.prefix_cache import PrefixCache, prefix_keys, split_points, state_bytes


def state(value: float) -> list[dict[str, torch.Tensor]]:
    return [{"state": torch.full((1, 2, 3), value), "scale": torch.full((1, 2), value)}]


SIZE = state_bytes(state(0.0))  # 32 bytes


def store(cache: PrefixCache, tokens: list[int], splits: list[int], end: int, value: float) -> None:
    """Put the state after ``tokens[:end]`` as the engine does, from a lookup of the whole prompt."""
    keys = cache.lookup(tokens, splits).keys
    cache.put(keys[end], tokens[:end], [s for s in splits if s <= end], state(value))


def test_split_points_are_blocks_and_hints():
    assert split_points(10, 4) == [4, 8, 10]
    assert split_points(8, 4) == [4, 8]
    assert split_points(10, 4, hints=[3, 8, 0, 10, 12]) == [3, 4, 8, 10]


def test_lookup_finds_the_deepest_stored_split_point_that_leaves_a_token():
    cache = PrefixCache(10 * SIZE, SIZE)
    tokens = list(range(100, 113))  # 13 tokens
    splits = split_points(13, 4)
    for end in (4, 8, 12):
        store(cache, tokens, splits, end, end)
    found = cache.lookup(tokens, splits)
    assert found.length == 12 and float(found.state[0]["state"].flatten()[0]) == 12
    assert cache.lookup(tokens[:12], split_points(12, 4)).length == 8  # a token must remain to be read
    other = tokens[:9] + [0, 0, 0]
    assert cache.lookup(other, split_points(12, 4)).length == 8
    assert cache.lookup([1, 2, 3, 4, 5], split_points(5, 4)).state is None


def test_same_tokens_read_in_other_slices_do_not_hit():
    """The state after 6 tokens read as 4 + 2 is not handed to a prompt that reads them as 3 + 3."""
    cache = PrefixCache(10 * SIZE, SIZE)
    tokens = list(range(10))
    store(cache, tokens, split_points(10, 4, hints=[6]), 6, 1.0)
    assert cache.lookup(tokens, split_points(10, 4, hints=[6])).length == 6
    assert cache.lookup(tokens, split_points(10, 4, hints=[3, 6])).length == 0


def test_a_hit_is_a_copy():
    cache = PrefixCache(10 * SIZE, SIZE)
    original = state(1.0)
    keys = cache.lookup([5, 6, 7], [2, 3]).keys
    cache.put(keys[2], [5, 6], [2], original)
    original[0]["state"].fill_(7.0)  # the engine goes on reading in place
    hit = cache.lookup([5, 6, 7], [2, 3]).state
    assert float(hit[0]["state"].max()) == 1.0
    hit[0]["state"].fill_(9.0)
    assert float(cache.lookup([5, 6, 7], [2, 3]).state[0]["state"].max()) == 1.0


def test_lru_bounded_in_bytes():
    cache = PrefixCache(3 * SIZE + SIZE // 2, SIZE)
    assert cache.capacity == 3
    for token in range(4):
        store(cache, [token, 9], [1, 2], 1, token)
    assert len(cache) == 3 and cache.bytes == 3 * SIZE and cache.evictions == 1
    assert cache.lookup([0, 9], [1, 2]).state is None  # the oldest went first
    cache.lookup([1, 9], [1, 2])  # now the most recently used
    store(cache, [4, 9], [1, 2], 1, 4)
    assert cache.lookup([1, 9], [1, 2]).state is not None and cache.lookup([2, 9], [1, 2]).state is None


def test_a_budget_below_one_state_turns_the_cache_off():
    cache = PrefixCache(SIZE - 1, SIZE)
    assert not cache.enabled
    cache.put(b"key", [1], [1], state(1))
    assert len(cache) == 0 and cache.lookup([1, 2], [1, 2]).length == 0


def test_prefixes_seen_before_are_reported():
    cache = PrefixCache(10 * SIZE, SIZE)
    assert cache.lookup([1, 2, 3, 4, 5], split_points(5, 2)).seen == set()
    assert cache.lookup([1, 2, 3, 9, 9], split_points(5, 2)).seen == {2}
    assert cache.lookup([1, 2, 3, 9], split_points(4, 2)).seen == {2, 4}


def test_keys_extend_along_the_prompt():
    tokens = list(range(10))
    keys = prefix_keys(tokens, [3, 6, 9])
    assert keys[:2] == prefix_keys(tokens[:6], [3, 6])
    assert keys[1] != prefix_keys([0, 1, 2, 3, 4, 99], [3, 6])[1]
    assert keys[1] != prefix_keys(tokens[:6], [2, 6])[1]
