"""The on-disk spool: bounded, ordered, and still there after the agent restarts."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gpuledger.agents.publisher import merge_sample_batches
from gpuledger.agents.spool import Spool, SpoolError
from gpuledger.schema.messages import SampleBatch

TOPIC = "gpuledger.samples"


def batch(node: str, ts: float, gpus: int = 2) -> bytes:
    samples = [
        {"ts": ts, "node": node, "gpu_uuid": f"GPU-{node}-{i}", "gpu_name": "NVIDIA L4"}
        for i in range(gpus)
    ]
    return orjson.dumps({"v": 1, "node": node, "samples": samples})


def frame(value: bytes, key: bytes = b"n1") -> int:
    """Bytes one record takes on disk: frame header, body header, topic, key, value."""
    return 16 + 8 + len(TOPIC) + len(key) + len(value)


def stamps(value: bytes) -> list[float]:
    return [s["ts"] for s in SampleBatch.model_validate_json(value).samples]


def drain(spool: Spool, max_bytes: int = 1 << 20) -> list[bytes]:
    """What a sender with a healthy Kafka would send, message by message."""
    sent: list[bytes] = []
    while records := spool.take(max_bytes, timeout_s=0):
        values = [r.value for r in records]
        sent.append(values[0] if len(values) == 1 else merge_sample_batches(values))
        spool.ack()
    return sent


def test_records_leave_in_the_order_they_came_and_each_once(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as spool:
        for second in range(5):
            spool.append(TOPIC, b"n1", batch("n1", second), samples=2)
            (record,) = spool.take(1, timeout_s=0)
            assert stamps(record.value) == [second, second]
            spool.ack()
        assert spool.take(1 << 20, timeout_s=0) == []
        assert (spool.stats.sent_samples, spool.stats.delayed_samples) == (10, 0)


def test_a_backlog_of_one_node_leaves_in_few_messages_and_events_keep_their_place(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path, 1 << 20) as spool:
        for second in range(3):
            spool.append(TOPIC, b"n1", batch("n1", second), samples=2)
        spool.append("gpuledger.jobs", b"job-1", b'{"v":1}')
        for second in range(3, 5):
            spool.append(TOPIC, b"n1", batch("n1", second), samples=2)
        spool.append(TOPIC, b"n2", batch("n2", 4), samples=2)
        assert spool.stats.delayed_samples == 10  # they waited behind the first one
        sent = drain(spool)
    assert [stamps(v) if b"samples" in v else "job" for v in sent] == [
        [0, 0, 1, 1, 2, 2],
        "job",
        [3, 3, 4, 4],
        [4, 4],
    ]
    assert SampleBatch.model_validate_json(sent[3]).node == "n2"


def test_records_outlive_the_agent_and_acknowledged_ones_do_not_come_back(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path, 1 << 20) as spool:
        for second in range(5):
            spool.append(TOPIC, b"n1", batch("n1", second), samples=2)
        spool.take(len(batch("n1", 0)), timeout_s=0)
        spool.ack()  # second 0 reached Kafka
        spool.take(len(batch("n1", 0)), timeout_s=0)  # second 1 in flight when the agent stops
    with Spool(tmp_path, 1 << 20) as restarted:
        assert restarted.stats.recovered_records == 4
        sent = drain(restarted)
        restarted.append(TOPIC, b"n1", batch("n1", 5), samples=2)
        sent += drain(restarted)
    assert [stamps(v) for v in sent] == [[1, 1, 2, 2, 3, 3, 4, 4], [5, 5]]


def test_a_full_spool_drops_the_oldest_counts_them_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size = frame(batch("n1", 0))
    with Spool(tmp_path, 3 * size) as spool:
        for second in range(10):
            spool.append(TOPIC, b"n1", batch("n1", second), samples=2)
        assert (spool.stats.dropped_records, spool.stats.dropped_samples) == (7, 14)
        assert spool.stats.backlog_samples == 6
    assert "is full" in caplog.text and "2 samples dropped so far" in caplog.text
    assert caplog.text.count("is full") == 1  # once a minute, not once a record
    with Spool(tmp_path, 3 * size) as restarted:
        assert [stamps(v) for v in drain(restarted)] == [[7, 7, 8, 8, 9, 9]]


def test_the_record_in_flight_is_never_dropped_and_the_next_oldest_go_first(
    tmp_path: Path,
) -> None:
    size = frame(batch("n1", 0))
    with Spool(tmp_path, 3 * size) as spool:
        spool.append(TOPIC, b"n1", batch("n1", 0), samples=2)
        assert spool.take(1, timeout_s=0)  # second 0 is with Kafka, not yet acknowledged
        for second in range(1, 8):
            spool.append(TOPIC, b"n1", batch("n1", second), samples=2)
        assert spool.stats.dropped_records == 5  # seconds 1..5
    with Spool(tmp_path, 3 * size) as restarted:  # it never got its acknowledgement
        assert [stamps(v) for v in drain(restarted, max_bytes=size)] == [
            [0, 0],
            [6, 6],
            [7, 7],
        ]
    with Spool(tmp_path, 3 * size) as again:
        assert again.stats.backlog_records == 0


def test_dropping_while_in_flight_then_acknowledging_skips_the_dropped_for_good(
    tmp_path: Path,
) -> None:
    size = frame(batch("n1", 0))
    with Spool(tmp_path, 2 * size) as spool:
        spool.append(TOPIC, b"n1", batch("n1", 0), samples=2)
        spool.take(1, timeout_s=0)
        for second in range(1, 6):
            spool.append(TOPIC, b"n1", batch("n1", second), samples=2)
        # room for two records, one of them in flight: seconds 1..4 were dropped meanwhile
        assert spool.stats.dropped_records == 4
        spool.ack()  # second 0 arrived
    with Spool(tmp_path, 2 * size) as restarted:
        assert [stamps(v) for v in drain(restarted)] == [[5, 5]]


def test_a_write_torn_by_a_crash_is_cut_off_and_the_rest_is_kept(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as spool:
        for second in range(3):
            spool.append(TOPIC, b"n1", batch("n1", second), samples=2)
    (segment,) = tmp_path.glob("seg-*.log")
    intact = segment.stat().st_size
    with segment.open("ab") as f:
        f.write(b"\x99\x00\x00\x00garbage")  # half a frame
    with Spool(tmp_path, 1 << 20) as restarted:
        assert [stamps(v) for v in drain(restarted)] == [[0, 0, 1, 1, 2, 2]]
        assert segment.stat().st_size == intact
        restarted.append(TOPIC, b"n1", batch("n1", 3), samples=2)
        assert [stamps(v) for v in drain(restarted)] == [[3, 3]]


def test_acknowledged_segments_are_deleted(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20, segment_bytes=400) as spool:
        for second in range(20):
            spool.append(TOPIC, b"n1", batch("n1", second), samples=2)
        assert len(list(tmp_path.glob("seg-*.log"))) > 5
        assert len(drain(spool, max_bytes=2000)) > 1
        assert len(list(tmp_path.glob("seg-*.log"))) == 1  # the one being written


def test_two_agents_cannot_share_a_spool_folder(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20), pytest.raises(SpoolError) as refused:
        Spool(tmp_path, 1 << 20)
    assert "in use by another agent" in str(refused.value)
    assert "--spool-dir" in str(refused.value)


def test_merged_batches_are_one_valid_sample_batch_in_order() -> None:
    merged = merge_sample_batches([batch("n1", 0), batch("n1", 1), batch("n1", 2, gpus=1)])
    parsed = SampleBatch.model_validate_json(merged)
    assert parsed.node == "n1"
    assert [(s["ts"], s["gpu_uuid"]) for s in parsed.samples] == [
        (0, "GPU-n1-0"),
        (0, "GPU-n1-1"),
        (1, "GPU-n1-0"),
        (1, "GPU-n1-1"),
        (2, "GPU-n1-0"),
    ]
