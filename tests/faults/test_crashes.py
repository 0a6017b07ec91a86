"""Workers that die: `kill -9` in the middle of a batch, and one of two workers of a group.
Nothing a dead worker stored is stored again, nothing it held is lost, and the corrections it
owed are made by whoever takes its samples partitions over."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
from kafka.partitioner import murmur2

from gpuledger.children import freeze
from gpuledger.schema.messages import JobEvent, JobState
from tests.faults.rig import T0, USD_PER_H100_HOUR, Fleet, Rig, until
from tests.support import rows, scalar

pytestmark = pytest.mark.integration


def partition_of(key: bytes, partitions: int) -> int:
    """Where the agents' producer (kafka-python's default partitioner) puts `key`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def job_cost(rig: Rig, job_id: str) -> float:
    found = rows(
        rig.client,
        "SELECT cost_usd FROM gpuledger.job_costs WHERE job_id = {j:String}",
        j=job_id,
    )
    return float(found[0][0]) if found else 0.0


def test_a_worker_killed_mid_batch_restarts_and_stores_every_sample_once(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("kill")
    worker = rig.worker("w1")
    fleet = Fleet("kill", nodes=20, gpus=4)
    prefix = f"GPU-{fleet.prefix}-"
    total = fleet.samples_in(300)
    train_gpu = fleet.gpu(0, 0)
    rig.sender.send(
        "jobs",
        "kill-train",
        JobEvent(
            ts=T0,
            job_id="kill-train",
            state=JobState.running,
            team="vision",
            gpu_uuids=[train_gpu],
            started_at=T0,
        ),
    )
    stream = rig.stream(fleet, T0, 300, per_wall_s=30)
    # Kill it while samples are flowing into the store.
    until(lambda: rig.tally(prefix)[0] >= total // 3, 60, "a third of the samples stored")
    assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
    stored_at_kill = rig.tally(prefix)[0]
    assert 0 < stored_at_kill < total
    rig.worker("w1")
    sent = stream.join()
    # An agent's spool replays its first 30 s after the restart: already costed, dropped.
    rig.send_batches(fleet.batches(T0, 30))
    # The job's finish arrives now, as a Slurm epilog sends it (the exit state, no end time),
    # stamped with its event time, long before the wall clock as in any replay: the restarted
    # worker merges it as the first worker would have, and the job ends at T0+150.
    rig.sender.send(
        "jobs", "kill-train", JobEvent(ts=T0 + 150, job_id="kill-train", state=JobState.succeeded)
    )
    rig.sender.flush()
    rig.wait_stored(prefix, sent)
    usd = 150 * USD_PER_H100_HOUR / 3600
    until(lambda: abs(job_cost(rig, "kill-train") - usd) <= 1e-9 * usd, 60, "the job's end")

    row = rig.row("kill -9 mid-batch, restart", fleet, sent)
    print(f"killed with {stored_at_kill:,} of {total:,} samples stored")
    rig.assert_exact(fleet, row, USD_PER_H100_HOUR)


def test_two_workers_one_killed_the_survivor_takes_over_its_samples_and_corrections(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("pair", partitions=4)
    first = rig.worker("a")
    second = rig.worker("b")
    until(
        lambda: (
            set(rig.assigned_partitions(first)).isdisjoint(rig.assigned_partitions(second))
            and set(rig.assigned_partitions(first)) | set(rig.assigned_partitions(second))
            == {0, 1, 2, 3}
        ),
        60,
        "the two workers to share the four partitions",
    )
    # Each knows the four partitions it may have to take over.
    for worker in (first, second):
        assert "corrections of 4 samples partitions" in worker.log()
    fleet = Fleet("pair", nodes=16, gpus=2)
    prefix = f"GPU-{fleet.prefix}-"
    sent = rig.send_batches(fleet.batches(T0, 60)) * fleet.gpus
    rig.wait_stored(prefix, sent)

    # A GPU whose samples the second worker costs: its node's key hashes (the producer's
    # murmur2) to one of the second worker's partitions.
    theirs = rig.assigned_partitions(second)
    node = next(n for n in range(fleet.nodes) if partition_of(fleet.node(n).encode(), 4) in theirs)
    gpu = fleet.gpu(node, 0)

    # The second worker hangs, then dies; meanwhile samples flow and a late job start names
    # its GPU from T0: the facts it wrote must go to the job, corrected by the survivor.
    assert second.proc is not None
    freeze(second.proc.pid)
    stream = rig.stream(fleet, T0 + 60, 60, per_wall_s=20)
    rig.sender.send(
        "jobs",
        "pair-train",
        JobEvent(
            ts=T0 + 130,
            job_id="pair-train",
            state=JobState.running,
            team="ranking",
            gpu_uuids=[gpu],
            started_at=T0,
        ),
    )
    rig.sender.flush()
    until(
        lambda: bool(
            scalar(rig.client, "SELECT count() FROM gpuledger.jobs WHERE job_id = 'pair-train'")
        ),
        30,
        "the survivor to store the job",
    )
    second.stop(signal.SIGKILL)
    sent += stream.join()
    rig.wait_stored(prefix, sent)
    usd = 120 * USD_PER_H100_HOUR / 3600
    until(
        lambda: abs(job_cost(rig, "pair-train") - usd) <= 1e-9 * usd,
        60,
        "the survivor to give the job its GPU's facts",
    )
    assert set(rig.assigned_partitions(first)) == {0, 1, 2, 3}

    row = rig.row("two workers, one killed", fleet, sent)
    rig.assert_exact(fleet, row, USD_PER_H100_HOUR)
