"""What receivers are sent, and how delivery behaves when a receiver is down."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from gpuledger.ledger.idle import AlertEvent
from gpuledger.schema.messages import Alert, AlertKind, AlertState
from gpuledger.streams.alert_delivery import Delivery
from gpuledger.streams.alert_format import alert_labels, alertmanager_alert, webhook_body
from tests.alerts.peers import WebhookReceiver

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def idle_alert(state: AlertState = AlertState.firing, ts: float = T0 + 600, **kw: str) -> Alert:
    fields: dict[str, Any] = {
        "gpu_uuid": "GPU-1",
        "node": "node-1",
        "job_id": "nb-7",
        "team": "applied",
        "project": "churn",
        **kw,
    }
    return Alert(
        ts=ts,
        kind=AlertKind.idle_allocated_gpu,
        state=state,
        since=T0,
        idle_seconds=ts - T0,
        wasted_usd=(ts - T0) * 4 / 3600,
        message="GPU GPU-1 on node-1 idle for 10 min while allocated to job nb-7",
        **fields,
    )


def test_alertmanager_gets_our_labels_and_the_dollars_wasted() -> None:
    body = alertmanager_alert(AlertEvent(idle_alert(), fired_at=T0 + 600))
    assert body["labels"] == {
        "alertname": "GpuIdleAllocated",
        "severity": "warning",
        "team": "applied",
        "project": "churn",
        "job_id": "nb-7",
        "gpu_uuid": "GPU-1",
        "node": "node-1",
    }
    assert body["annotations"]["wasted_usd"] == "0.67"
    assert body["annotations"]["summary"] == (
        "Idle allocated GPU GPU-1 on node-1: job nb-7 (applied/churn), 10 min idle, $0.67 wasted"
    )
    assert body["startsAt"] == "2026-01-01T00:10:00.000Z" and "endsAt" not in body


def test_a_resolved_alert_ends_at_its_resolution_and_keeps_its_start() -> None:
    resolved = AlertEvent(idle_alert(AlertState.resolved, ts=T0 + 900), fired_at=T0 + 600)
    body = alertmanager_alert(resolved)
    assert (body["startsAt"], body["endsAt"]) == (
        "2026-01-01T00:10:00.000Z",
        "2026-01-01T00:15:00.000Z",
    )


def test_empty_labels_are_left_out() -> None:
    labels = alert_labels(AlertEvent(idle_alert(team="", project="")))
    assert "team" not in labels and "project" not in labels


def test_the_webhook_gets_our_json_or_slacks_text() -> None:
    event = AlertEvent(idle_alert())
    ours = webhook_body(event, slack=False)
    assert ours["status"] == "firing" and ours["alert"]["job_id"] == "nb-7"
    assert ours["labels"]["alertname"] == "GpuIdleAllocated"
    slack = webhook_body(event, slack=True)
    assert slack == {
        "text": "[FIRING] Idle allocated GPU GPU-1 on node-1: job nb-7 (applied/churn), "
        "10 min idle, $0.67 wasted"
    }


def test_a_receiver_that_is_down_is_retried_with_backoff_until_it_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = WebhookReceiver()  # nothing listens on its port yet

    async def story() -> Delivery:
        async with aiohttp.ClientSession() as session:

            async def post(events: list[AlertEvent]) -> None:
                for event in events:
                    body = webhook_body(event, slack=True)
                    async with session.post(receiver.url, json=body) as reply:
                        reply.raise_for_status()

            delivery = Delivery("webhook", post, retry_max_s=0.4)
            delivery.start()
            delivery.put([AlertEvent(idle_alert())])
            await asyncio.sleep(1.0)  # a few failed tries: 0.2, 0.4, 0.4 s apart
            assert receiver.bodies == [] and delivery.failures >= 2
            receiver.start()
            assert await delivery.drained(5.0)
            await delivery.stop()
            return delivery

    with caplog.at_level(logging.INFO, logger="gpuledger.alerts"):
        try:
            delivery = asyncio.run(story())
        finally:
            receiver.stop()
    assert len(receiver.bodies) == 1 and receiver.bodies[0]["text"].startswith("[FIRING]")
    assert delivery.sent == 1
    assert "webhook: delivering 1 alerts failed" in caplog.text and "retrying in" in caplog.text
    assert "webhook: delivered 1 alerts after" in caplog.text


def test_alertmanager_queue_keeps_only_the_newest_state_of_an_alert() -> None:
    async def story() -> list[list[AlertEvent]]:
        sent: list[list[AlertEvent]] = []

        async def send(events: list[AlertEvent]) -> None:
            sent.append(events)

        delivery = Delivery("alertmanager", send, retry_max_s=1, coalesce=True)
        delivery.put([AlertEvent(idle_alert()), AlertEvent(idle_alert(gpu_uuid="GPU-2"))])
        delivery.put([AlertEvent(idle_alert(AlertState.resolved, ts=T0 + 700))])
        delivery.start()
        await delivery.drained(2.0)
        await delivery.stop()
        return sent

    (batch,) = asyncio.run(story())
    assert [(e.alert.gpu_uuid, e.alert.state.value) for e in batch] == [
        ("GPU-2", "firing"),
        ("GPU-1", "resolved"),
    ]


def test_a_queue_that_overflows_drops_its_oldest_alerts_and_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gpuledger.streams.alert_delivery.MAX_QUEUE", 3)

    async def story() -> Delivery:
        async def send(events: list[AlertEvent]) -> None:
            raise ConnectionError("unreachable")

        delivery = Delivery("webhook", send, retry_max_s=1)
        delivery.put([AlertEvent(idle_alert(ts=T0 + 600 + i)) for i in range(5)])
        return delivery

    with caplog.at_level(logging.WARNING, logger="gpuledger.alerts"):
        delivery = asyncio.run(story())
    assert delivery.dropped == 2
    assert "dropped the 2 oldest alerts" in caplog.text
