"""The worker's in-flight decisions: the grace, duplicates, and what may be committed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpuledger.ledger.joiner import Held, Joiner
from gpuledger.schema.messages import GpuSample
from tests.support import gpu_sample


def sample(gpu: str, ts: float) -> GpuSample:
    return gpu_sample(gpu, ts)


def held(gpu: str, ts: float, partition: int = 0) -> Held:
    return Held(sample(gpu, ts), partition, 0, 0.0)


def test_a_sample_waits_for_its_grace_of_event_time() -> None:
    joiner = Joiner(grace_s=1.0, max_hold_wall_s=100.0)
    joiner.offer([sample("g", 100.0)], partition=0, offset=0, now_wall=0.0)
    assert joiner.due(now_wall=0.0) == []  # stream time is 101: not 1 s past its end yet
    joiner.offer([sample("g", 101.0)], partition=0, offset=1, now_wall=0.0)
    released = joiner.due(now_wall=0.0)
    assert [h.sample.ts for h in released] == [100.0]


def test_a_quiet_partition_releases_after_the_wall_clock_limit() -> None:
    joiner = Joiner(grace_s=1.0, max_hold_wall_s=3.0)
    joiner.offer([sample("g", 100.0)], partition=0, offset=0, now_wall=10.0)
    assert joiner.due(now_wall=12.9) == []
    assert len(joiner.due(now_wall=13.0)) == 1


def test_a_sample_seen_twice_is_dropped_the_second_time() -> None:
    joiner = Joiner()
    first = joiner.offer([sample("g", 5.0), sample("h", 5.0)], 0, 0, 0.0)
    again = joiner.offer([sample("g", 5.0), sample("g", 6.0)], 0, 1, 0.0)
    assert first == []
    assert [s.ts for s in again] == [5.0]
    assert joiner.held_count == 3
    assert joiner.duplicates == 1


def test_offsets_are_committable_only_below_the_first_message_still_held() -> None:
    joiner = Joiner(grace_s=1.0, max_hold_wall_s=100.0)
    joiner.offer([sample("g", 100.0)], 0, 7, 0.0)
    joiner.offer([sample("g", 200.0)], 0, 8, 0.0)
    assert joiner.committable() == {0: 7}
    released = joiner.due(0.0)  # the first is past its grace, the second is not
    assert [h.offset for h in released] == [7]
    assert joiner.committable() == {0: 7}  # released is not stored yet
    joiner.stored(released)
    assert joiner.committable() == {0: 8}
    joiner.stored(joiner.due(0.0, flush_all=True))
    assert joiner.committable() == {0: 9}


def test_a_message_of_only_duplicates_or_dead_letters_is_committable_at_once() -> None:
    joiner = Joiner()
    joiner.offer([], 3, 41, 0.0)
    assert joiner.committable() == {3: 42}


def test_a_taken_over_partitions_samples_up_to_the_newest_fact_are_checked_in_the_store() -> None:
    joiner = Joiner()
    joiner.check_store_until(0, 50.0)
    assert joiner.needs_store_check(held("g", 50.0, partition=0))
    assert joiner.needs_store_check(held("g", 20.0, partition=0))
    assert not joiner.needs_store_check(held("g", 51.0, partition=0))
    assert not joiner.needs_store_check(held("g", 50.0, partition=1))
    joiner.check_store_until(0, 40.0)  # an older answer never lowers what is known
    assert joiner.needs_store_check(held("g", 45.0, partition=0))
    joiner.revoke({0})
    assert not joiner.needs_store_check(held("g", 45.0, partition=0))


def test_samples_older_than_the_memory_horizon_are_sent_to_the_store_check() -> None:
    joiner = Joiner(dedup_horizon_s=60.0)
    joiner.offer([sample("g", 1000.0)], 0, 0, 0.0)
    assert joiner.needs_store_check(held("g", 900.0))
    assert not joiner.needs_store_check(held("g", 990.0))


@given(
    st.floats(0.0, 2000.0),
    st.lists(st.tuples(st.integers(0, 2), st.floats(0.0, 2000.0)), max_size=3),
    st.lists(st.tuples(st.integers(0, 2), st.floats(0.0, 2000.0)), max_size=20),
)
def test_the_batch_store_check_picks_what_each_sample_would(
    newest: float, taken_over: list[tuple[int, float]], samples: list[tuple[int, float]]
) -> None:
    joiner = Joiner(dedup_horizon_s=600.0)
    joiner.offer([sample("w", newest)], 0, 0, 0.0)
    for partition, until in taken_over:
        joiner.check_store_until(partition, until)
    helds = [held("g", ts, partition) for partition, ts in samples]
    assert joiner.to_check(helds) == [h for h in helds if joiner.needs_store_check(h)]
