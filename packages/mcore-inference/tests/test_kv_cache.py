"""The KV-cache manager's bookkeeping: blocks, references, the prefix cache and eviction."""

from __future__ import annotations

from mcore.inference.kv_cache import SCRATCH_BLOCK, KVCacheManager
from mcore.inference.request import Request
from mcore.inference.sampling import SamplingParams

BLOCK = 4


def _request(rid, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), max_new_tokens=8)


def _compute(kv: KVCacheManager, request: Request, n: int) -> None:
    """What a step does: room for ``n`` tokens, compute them, name the full blocks."""
    assert kv.allocate(request, n)
    request.num_computed_tokens += n
    kv.commit(request)


def test_blocks_follow_computed_tokens_and_come_back_when_freed() -> None:
    kv = KVCacheManager(6, BLOCK)
    request = _request("a", list(range(10)))
    _compute(kv, request, 10)
    assert len(kv.block_ids("a")) == 3 and SCRATCH_BLOCK not in kv.block_ids("a")
    assert kv.usage() == 3 / 5
    other = _request("b", list(range(100, 112)))
    assert not kv.allocate(other, 12)  # 3 blocks wanted, 2 left: nothing is taken
    assert kv.block_ids("b") == [] and kv.usage() == 3 / 5
    kv.free(request)
    assert kv.usage() == 0 and kv.allocate(other, 12)


def test_a_shared_prefix_is_matched_block_by_block_leaving_the_last_token() -> None:
    kv = KVCacheManager(16, BLOCK)
    first = _request("a", list(range(13)))
    _compute(kv, first, 13)  # 3 full blocks named
    same_start = _request("b", [*range(9), 99, 98, 97, 96])
    assert kv.match_prefix(same_start) == 8  # blocks 0-3 and 4-7; block 8-11 differs
    assert kv.block_ids("b") == kv.block_ids("a")[:2]
    exact = _request("c", list(range(12)))  # all 3 blocks cached, but the last token recomputes
    assert kv.match_prefix(exact) == 8
    assert kv.prefix_hits == 16


def test_released_named_blocks_stay_cached_until_their_memory_is_needed() -> None:
    kv = KVCacheManager(5, BLOCK)  # 4 usable blocks
    first = _request("a", list(range(9)))
    _compute(kv, first, 9)
    kv.free(first)
    assert kv.usage() == 0
    again = _request("b", list(range(9)))
    assert kv.match_prefix(again) == 8  # still cached after the free
    kv.free(again)
    # A request that needs every block evicts the cached ones; the cache then forgets them.
    big = _request("c", list(range(500, 516)))
    assert kv.allocate(big, 16)
    kv.free(big)
    assert kv.match_prefix(_request("d", list(range(9)))) == 0


def test_new_weights_forget_every_cached_block() -> None:
    kv = KVCacheManager(16, BLOCK)
    first = _request("a", list(range(9)))
    _compute(kv, first, 9)
    kv.reset_prefix_cache()
    _compute(kv, first, 0)  # blocks computed under the old weights are not named again
    assert kv.match_prefix(_request("b", list(range(9)))) == 0


def test_prefix_caching_can_be_turned_off() -> None:
    kv = KVCacheManager(16, BLOCK, enable_prefix_caching=False)
    _compute(kv, _request("a", list(range(9))), 9)
    assert kv.match_prefix(_request("b", list(range(9)))) == 0


def test_state_slots_follow_admission_preemption_and_finish() -> None:
    """Hybrid models: a running request holds one recurrent-state slot (never the scratch slot
    0), handed out lowest first; preemption, finish and abort give it back; admission waits
    for a free one."""
    from mcore.inference.recurrent_state import SCRATCH_SLOT, StateSlots
    from mcore.inference.scheduler import Scheduler

    kv = KVCacheManager(7, BLOCK, enable_prefix_caching=False)  # 6 usable blocks
    slots = StateSlots(3)  # 2 request slots
    scheduler = Scheduler(kv, max_requests=8, max_tokens=None, state_slots=slots)
    a, b, c = (_request(r, list(range(8))) for r in "abc")
    for request in (a, b, c):
        scheduler.add(request)
    out = scheduler.schedule()
    assert [ch.request for ch in out.chunks] == [a, b]  # c waits: no slot, though blocks fit
    assert (slots.slot("a"), slots.slot("b")) == (1, 2) and SCRATCH_SLOT not in slots.in_use()
    assert sorted(slots.take_to_zero()) == [1, 2] and slots.take_to_zero() == []
    for ch in out.chunks:
        ch.request.num_computed_tokens += ch.num_tokens
        ch.request.append_token(1, None, None)
    scheduler.finish(a)
    assert slots.get("a") is None and slots.num_free == 1
    out = scheduler.schedule()  # b decodes, c takes a's slot
    assert slots.slot("c") == 1 and slots.take_to_zero() == [1]
    for ch in out.chunks:
        ch.request.num_computed_tokens += ch.num_tokens
        ch.request.append_token(1, None, None)
    # b and c grow until the 6 blocks run out: c (admitted last) is preempted, its slot freed.
    b.all_token_ids.extend([1] * 12)
    out = scheduler.schedule()
    assert out.preempted == [c] and slots.get("c") is None and slots.in_use() == [2]
    scheduler.finish(b)
    scheduler.finish(c)
    assert slots.num_in_use == 0 and slots.num_free == 2 and kv.usage() == 0


def test_the_block_table_holds_each_live_requests_blocks_in_its_row() -> None:
    kv = KVCacheManager(40, BLOCK, max_blocks_per_request=2)  # narrower than needed: it grows
    first = _request("a", list(range(13)))
    _compute(kv, first, 13)
    shared = _request("b", [*range(8), 50, 51, 52])  # its first two blocks are a's
    assert kv.match_prefix(shared) == 8
    _compute(kv, shared, 3)
    table = kv.table
    for rid in "ab":
        row = table.array[table.row(rid)]
        blocks = kv.block_ids(rid)
        assert row[: len(blocks)].tolist() == blocks and set(row[len(blocks) :]) <= {SCRATCH_BLOCK}
    assert table.row("a") != table.row("b") and table.row("nobody") == 0
    kv.free(first)
    assert table.row("a") == 0 and set(table.array[0]) == {SCRATCH_BLOCK}
    many = [_request(f"r{i}", list(range(100 * i, 100 * i + 5))) for i in range(12)]
    for request in many:  # more requests than the table's first rows: it grows too
        _compute(kv, request, 5)
    rows = {table.row(r.request_id) for r in many} | {table.row("b")}
    assert len(rows) == 13 and 0 not in rows
