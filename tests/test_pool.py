"""Tests for server/engine/pool.py: allocation, sharing, freeing, and which blocks are handed out
(freed ones before never-used ones, so that committed memory follows peak use, not traffic)."""

from __future__ import annotations

import pytest

from server.engine.pool import NULL_BLOCK, BlockPool, PoolExhausted, SeqBlocks


def test_allocate_share_and_release_count_holders() -> None:
    pool = BlockPool(5, 4)  # 4 usable blocks, block 0 reserved
    a = pool.allocate(2)
    assert NULL_BLOCK not in a and len(set(a)) == 2
    assert (pool.num_used, pool.num_free) == (2, 2)
    pool.share(a)  # a second holder (a task prefix used by two rows)
    pool.release(a)
    assert pool.num_used == 2  # still held once
    pool.release(a)
    assert (pool.num_used, pool.num_free) == (0, 4)
    assert (pool.stats.allocated, pool.stats.freed, pool.stats.peak_used) == (2, 2, 2)
    with pytest.raises(AssertionError):
        pool.release(a)  # released more often than held


def test_exhaustion_raises_and_takes_nothing() -> None:
    pool = BlockPool(4, 4)
    held = pool.allocate(2)
    with pytest.raises(PoolExhausted):
        pool.allocate(2)
    assert pool.num_free == 1
    assert len(set(held + pool.allocate(1))) == 3  # every usable block, none twice


def test_freed_blocks_are_reused_before_never_used_ones() -> None:
    pool = BlockPool(101, 4)
    for _ in range(50):  # one request after another, each needing 3 blocks
        blocks = pool.allocate(3)
        pool.release(blocks)
    assert pool.touched == 3  # 150 allocations, only 3 blocks' memory ever committed
    assert pool.stats.allocated == 150 and pool.num_free == 100

    first = pool.allocate(2)
    second = pool.allocate(2)  # one reused, one fresh
    assert pool.touched == 4
    pool.release(second)
    pool.release(first)
    assert sorted(pool.allocate(4)) == sorted(first + second)  # the last freed come back first
    assert pool.touched == 4


def test_touched_grows_with_peak_use_and_every_block_is_reachable() -> None:
    pool = BlockPool(9, 2)
    a = pool.allocate(3)
    b = pool.allocate(2)
    pool.release(a)
    assert pool.touched == 5
    c = pool.allocate(6)  # 3 freed + 3 never used
    assert pool.touched == 8 and pool.num_free == 0
    assert sorted(b + c) == list(range(1, 9))


def test_seq_blocks_slots_follow_prefix_then_own_blocks() -> None:
    seq = SeqBlocks(block_size=4, prefix_slots=[40, 41], own_blocks=[7, 3], own_len=5)
    assert seq.length == 7 and seq.own_capacity == 8
    assert seq.slots() == [40, 41, 28, 29, 30, 31, 12]
    assert seq.new_slots(3) == [13, 14, 15]
    with pytest.raises(AssertionError):
        seq.new_slots(4)  # past the blocks it holds
