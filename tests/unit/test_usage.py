"""What identifies a usage event, and which events of a batch are stored."""

from __future__ import annotations

from gpuledger.schema.messages import UsageEvent
from gpuledger.streams.usage import new_events, usage_key


def event(ts: float, requests: int, source: str = "", job_id: str = "serve") -> UsageEvent:
    return UsageEvent(ts=ts, job_id=job_id, source=source, requests=requests, tokens=requests * 9)


def test_a_message_without_a_source_still_parses_with_the_empty_source() -> None:
    old = UsageEvent.model_validate_json(b'{"v":1,"ts":10.5,"job_id":"serve","requests":3}')
    assert (old.source, old.requests, old.tokens) == ("", 3, 0)
    assert usage_key(old) == ("serve", "", 10_500)


def test_a_source_is_normalised_like_a_label_never_refused() -> None:
    assert UsageEvent(ts=1.0, job_id="serve", source="pod\x00-a" + "x" * 300).source == (
        "pod-a" + "x" * 251
    )


def test_the_identity_is_job_source_and_the_millisecond() -> None:
    assert usage_key(event(100.0004, 1)) == usage_key(event(100.0, 2))
    assert usage_key(event(100.0, 1, "pod-a")) != usage_key(event(100.0, 1, "pod-b"))
    assert usage_key(event(100.0, 1, job_id="a")) != usage_key(event(100.0, 1, job_id="b"))
    assert usage_key(event(100.0, 1)) != usage_key(event(100.001, 1))


def test_two_replicas_reporting_one_second_both_count() -> None:
    batch = [event(100.0, 5, "pod-a"), event(100.0, 7, "pod-b")]
    assert new_events(batch, set()) == batch


def test_an_event_sent_again_counts_once_the_first_winning() -> None:
    first, again = event(100.0, 5, "pod-a"), event(100.0, 6, "pod-a")
    assert new_events([first, again, event(101.0, 1, "pod-a")], set()) == [
        first,
        event(101.0, 1, "pod-a"),
    ]


def test_events_already_stored_are_dropped_whatever_their_batch() -> None:
    sent = [event(100.0 + i, i + 1, "pod-a") for i in range(6)]
    stored = {usage_key(e) for e in sent[:4]}
    # A replay cut into other batches: what is stored goes, what is not is stored.
    assert new_events(sent[2:], stored) == sent[4:]
    assert new_events(sent[:3], stored) == []
