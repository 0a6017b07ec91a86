"""Re-attribution as a set operation: who held each GPU explicitly over a job change's scope,
decided once per span of time instead of once per sample. Pure: the store applies the spans
to the samples they cover (streams/sql.py `rehold`).

A job event that moves what a job holds (its GPUs, its start, its end) changes who had some
GPU-seconds, never what they cost. Between two moments at which a job on a GPU starts or
ends, the same job holds it (`MetadataState.holder`), so a GPU's samples over a scope are
attributed by a handful of `HolderSpan`s. A sample whose span names a job becomes one row of
that job, the whole GPU; a sample no job holds, none of whose processes carries a job id,
becomes one unallocated row. Both are the cost model's rows, their money from the raw
sample's interval and utilization (`cost_sample`'s arithmetic).

What a span cannot say goes back to the worker, which re-costs the sample: a sample no job
holds whose processes name jobs (its split is the processes' share of the GPU), and one at a
span's first millisecond (the sample may lie half a millisecond before the change).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpuledger.ledger.cost import JobRecord
from gpuledger.ledger.reprice import SINCE_START_MS, RepriceChunk, chunk_token
from gpuledger.ledger.state import MetadataState
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import JOB_TAGS, JobType


@dataclass(frozen=True)
class HolderSpan:
    """The job (or none: `job_id` '') explicitly holding a GPU from `since_ms` until the
    GPU's next span, and the tags its rows carry."""

    gpu_uuid: str
    since_ms: int
    job_id: str
    tags: tuple[str, ...]
    """The holder's `JOB_TAGS` as its rows store them ('' where it has none)."""

    def as_tuple(self) -> tuple[str | int, ...]:
        """The span as one element of the store's `holders` parameter (streams/sql.py)."""
        return (self.gpu_uuid, self.since_ms, self.job_id, *self.tags)


def _span(gpu: str, since_ms: int, job: JobRecord | None) -> HolderSpan:
    if job is None:
        return HolderSpan(gpu, since_ms, "", ("",) * len(JOB_TAGS))
    tags = []
    for name in JOB_TAGS:
        value = getattr(job, name)
        tags.append(value.value if isinstance(value, JobType) else (value or ""))
    return HolderSpan(gpu, since_ms, job.job_id, tuple(tags))


def holder_spans(
    state: MetadataState, gpus: Iterable[str], t_from: float | None, t_to: float | None
) -> list[HolderSpan]:
    """Each GPU's spans over [t_from, t_to): who holds it as `allocate` decides, cut at every
    start and end of its jobs in between."""
    out: list[HolderSpan] = []
    for gpu in sorted(set(gpus)):
        jobs = [state.jobs[j] for j in state.jobs_by_gpu.get(gpu, ())]
        cuts = sorted(
            {
                t
                for job in jobs
                if job.started_at is not None
                for t in (job.started_at, job.end())
                if not math.isinf(t)
                and (t_from is None or t > t_from)
                and (t_to is None or t < t_to)
            }
        )
        first_at = t_from if t_from is not None else (cuts[0] - 1.0 if cuts else 0.0)
        spans = [_span(gpu, SINCE_START_MS, state.holder(gpu, first_at))]
        for t in cuts:
            span = _span(gpu, to_ms(t), state.holder(gpu, t))
            if span.since_ms == spans[-1].since_ms:
                spans[-1] = span  # two changes in one millisecond: the later one holds on
            else:
                spans.append(span)
        out += spans
    return out


def rehold_token(chunk: RepriceChunk, spans: Sequence[HolderSpan], stored_rows: int) -> str:
    """The dedup token of a chunk's re-attribution (see `reprice_token`)."""
    return chunk_token("rehold", chunk, stored_rows, [span.as_tuple() for span in spans])
