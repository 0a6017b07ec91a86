"""The hardware feed: the scenario engine's answer, written where the simulated library reads it.

`NvmlFeed` owns a state file (layout in `layout.py`) that the simulated `libnvidia-ml.so.1`
maps. `show(t)` writes what `Scenario.hardware(node, t)` and `Scenario.process_utilization`
say NVML reports at `t`; with a `proc_root` it also writes the scenario's processes as a
/proc tree (`stat`, `comm`, `cgroup`, `environ`), so that the agent's /proc attribution runs on
them unchanged (`--proc-root`). The same engine drives the Python shim (`agents/sim/nvml.py`)
behind `--simulate`, so the two cannot disagree.

Tests make the hardware misbehave here, at the C ABI: `fail()` a call with an NVML error
code, `kill()` a process (optionally only after some calls, i.e. between two calls of one
read), `show(t2, after_call=...)` to change the world between two calls, and `quirks` for
driver behaviours seen in the field.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import mmap
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpuledger.agents.gpm import METRICS
from gpuledger.agents.sim.engine import PROCESS_SAMPLE_BUFFER_S, Scenario
from gpuledger.agents.sim.hardware import Activity, NodeHardware, ProcessState
from gpuledger.agents.sim.libnvml import layout

STATE_ENV = "GPULEDGER_SIMNVML_STATE"
_STAT_TAIL = " 0" * 30  # the fields of /proc/<pid>/stat after the start time


@dataclass(frozen=True)
class _Written:
    start_ticks: int
    pid_dir: Path


class NvmlFeed:
    """Serves `node` of `scenario` to the simulated library through the file at `path`."""

    def __init__(
        self,
        path: Path,
        scenario: Scenario,
        node: str,
        *,
        proc_root: Path | None = None,
        quirks: int = 0,
    ) -> None:
        scenario.gpus(node)  # raises KeyError naming the scenario's nodes
        if len(scenario.gpus(node)) > layout.MAX_GPUS:
            raise ValueError(
                f"node {node} has {len(scenario.gpus(node))} GPUs; the simulated library "
                f"serves at most {layout.MAX_GPUS}"
            )
        self.path = Path(path)
        self.scenario = scenario
        self.node = node
        self.proc_root = proc_root
        self.quirks = quirks
        self.killed: set[int] = set()
        self._procs_written: dict[int, _Written] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = ctypes.sizeof(layout.NvmlState)
        with open(self.path, "wb") as f:
            f.truncate(size)
        self._fd = os.open(self.path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, size)
        self._state = layout.NvmlState.from_buffer(self._map)
        self._state.magic = layout.MAGIC
        self._state.layout_version = layout.LAYOUT_VERSION
        self._lock = threading.Lock()
        self._last_t: float | None = None
        self._last_clock = True
        # GPM counters per (GPU, MIG index or None): activity integrated up to `_gpm_t`.
        self._gpm_acc: dict[tuple[int, int | None], list[float]] = {}
        self._gpm_t: float | None = None
        if proc_root is not None:
            proc_root.mkdir(parents=True, exist_ok=True)

    # -- what tests and the live loop call

    @property
    def env(self) -> dict[str, str]:
        """The environment variable the library reads to find this feed."""
        return {STATE_ENV: str(self.path)}

    @property
    def calls(self) -> int:
        """How many NVML calls the library has answered."""
        return int(self._state.calls)

    def show(
        self,
        t: float,
        *,
        clock: bool = True,
        after_call: str | None = None,
        calls: int = 1,
    ) -> NodeHardware:
        """Make the library report the hardware at scenario time `t`.

        `clock`: the library's "now" is `t` (deterministic tests); otherwise the real clock,
        for a live agent. `after_call`: the world changes only after `calls` more calls of
        that C function (the world changing between two calls of one read).
        """
        hardware = self.scenario.hardware(self.node, t)
        world = self._world(hardware, t, clock)
        with self._lock:
            state = self._state
            self._begin_write()
            try:
                if after_call is None:
                    state.switch_function = b""
                    state.switch_after = 0
                    target = state.active & 1
                else:
                    state.switch_function = after_call.encode()
                    state.switch_after = calls
                    target = (state.active & 1) ^ 1
                ctypes.memmove(
                    ctypes.addressof(state.worlds[target]),
                    ctypes.addressof(world),
                    ctypes.sizeof(world),
                )
            finally:
                self._end_write()
            if after_call is None:
                self._last_t, self._last_clock = t, clock
            self._write_proc(hardware)
        return hardware

    def kill(self, pid: int, *, after_call: str | None = None, calls: int = 1) -> None:
        """The process exits: it leaves the process lists, the samples and /proc."""
        self.killed.add(pid)
        if self._last_t is not None:
            self.show(self._last_t, clock=self._last_clock, after_call=after_call, calls=calls)

    def fail(
        self, function: str, code: int, *, uuid: str | None = None, times: int | None = None
    ) -> None:
        """Make C function `function` answer `code` (for one device, for `times` calls)."""
        with self._lock:
            state = self._state
            if state.fault_count >= layout.MAX_FAULTS:
                raise ValueError(f"at most {layout.MAX_FAULTS} faults at once")
            self._begin_write()
            try:
                fault = state.faults[state.fault_count]
                fault.function = function.encode()
                fault.uuid = (uuid or "").encode()
                fault.code = code
                fault.remaining = layout.ALWAYS if times is None else times
                state.fault_count += 1
            finally:
                self._end_write()

    def clear_faults(self) -> None:
        with self._lock:
            self._begin_write()
            self._state.fault_count = 0
            self._end_write()

    def run(self, stop: threading.Event) -> None:
        """Follow the wall clock until `stop`: at k - 0.5 s, show the hardware read at k.

        A read at wall time k + δ (δ < 0.5 s) then reports the second [k - 1, k), as the
        scenario engine defines it.
        """
        while not stop.is_set():
            k = math.floor(time.time() + 0.5) + 1
            self.show(k, clock=False)
            if stop.wait(max(0.0, k - 0.5 - time.time())):
                break

    def close(self) -> None:
        with self._lock:
            del self._state
            self._map.close()
            os.close(self._fd)

    def __enter__(self) -> NvmlFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing

    def _begin_write(self) -> None:
        self._state.seq += 1  # odd: the library waits

    def _end_write(self) -> None:
        self._state.seq += 1

    def _world(self, hardware: NodeHardware, t: float, clock: bool) -> layout.World:
        world = layout.World()
        world.clock_us = round(t * 1_000_000) if clock else 0
        world.quirks = self.quirks
        world.driver_version = hardware.driver_version.encode()[: layout.DRIVER_LEN - 1]
        world.gpu_count = len(hardware.gpus)
        # The counters advance by what the devices did since the last world (the engine's
        # activity integrated over time), so a later sample minus an earlier one, over the
        # time between them, is the mean rate between them.
        gained: dict[tuple[int, int | None], Activity] = {}
        if self._gpm_t is None or t > self._gpm_t:
            if self._gpm_t is not None:
                gained = self.scenario.activity_between(self.node, self._gpm_t, t)
            self._gpm_t = t
        world.gpm_time_us = round(self._gpm_t * 1_000_000)
        for slot, state in zip(world.gpus, hardware.gpus, strict=False):
            gpu = state.gpu
            slot.name = gpu.name.encode()[: layout.NAME_LEN - 1]
            slot.uuid = gpu.uuid.encode()
            slot.memory_total = gpu.memory_total_bytes
            slot.memory_used = state.used_memory_bytes
            slot.util_gpu = round(100 * state.util_gpu)
            slot.util_mem = round(100 * state.util_mem)
            slot.power_mw = round(state.power_w * 1000)
            slot.power_limit_mw = round(gpu.power_limit_w * 1000)
            slot.temp_c = state.temp_c
            slot.max_mig = gpu.max_mig_devices
            slot.mig_enabled = int(gpu.mig_enabled)
            slot.mig_count = len(state.mig)
            slot.gpm_supported = int(gpu.gpm)
            self._write_gpm(slot.gpm, (gpu.index, None), state.activity, gained)
            placed: list[tuple[ProcessState, int]] = []
            for mig_slot, mig in zip(slot.mig, state.mig, strict=False):
                mig_slot.uuid = mig.instance.uuid.encode()
                mig_slot.profile = mig.instance.profile.encode()
                mig_slot.slices = mig.instance.slices
                mig_slot.gpu_instance_id = mig.instance.index + 1
                mig_slot.memory_total = mig.instance.memory_total_bytes
                mig_slot.memory_used = mig.used_memory_bytes
                key = (gpu.index, mig.instance.index)
                self._write_gpm(mig_slot.gpm, key, mig.activity, gained)
                placed.extend((p, mig.instance.index) for p in mig.processes)
            if not gpu.mig_enabled:
                placed = [(p, layout.NO_MIG) for p in state.processes]
            placed = [(p, m) for p, m in placed if p.pid not in self.killed]
            slot.process_count = min(len(placed), layout.MAX_PROCS)
            for proc_slot, (process, mig_index) in zip(slot.processes, placed, strict=False):
                proc_slot.pid = process.pid
                proc_slot.kind = (
                    layout.KIND_GRAPHICS if process.kind == "graphics" else layout.KIND_COMPUTE
                )
                proc_slot.mig = mig_index
                proc_slot.used_memory = process.used_memory_bytes
                proc_slot.name = process.name.encode()[: layout.PROCESS_NAME_LEN - 1]
            # The driver's buffer: samples of the last PROCESS_SAMPLE_BUFFER_S seconds (and,
            # for a live agent, of the next second, which the library releases as time passes).
            until = t if clock else t + 1.0
            samples = [
                s
                for s in self.scenario.process_utilization(
                    self.node, gpu.index, until - PROCESS_SAMPLE_BUFFER_S, until
                )
                if s.pid not in self.killed
            ][-layout.MAX_SAMPLES :]
            slot.sample_count = len(samples)
            for sample_slot, sample in zip(slot.samples, samples, strict=False):
                sample_slot.pid = sample.pid
                sample_slot.ts_us = sample.ts_us
                sample_slot.sm_util = sample.sm_util
                sample_slot.mem_util = sample.mem_util
        return world

    def _write_gpm(
        self,
        slot: layout.Gpm,
        key: tuple[int, int | None],
        now: Activity,
        gained: dict[tuple[int, int | None], Activity],
    ) -> None:
        acc = self._gpm_acc.setdefault(key, [0.0] * len(METRICS))
        more = gained.get(key)
        for i, (_, name) in enumerate(METRICS):  # Activity's fields are GpuSample's
            if more is not None:
                acc[i] += getattr(more, name)
            slot.acc[i] = acc[i]
            slot.rate[i] = getattr(now, name)

    def _write_proc(self, hardware: NodeHardware) -> None:
        """The scenario's processes as /proc/<pid> entries; exited ones removed."""
        if self.proc_root is None:
            return
        present: dict[int, ProcessState] = {}
        for state in hardware.gpus:
            for process in state.processes:
                if process.pid not in self.killed:
                    present[process.pid] = process
        for pid in list(self._procs_written):
            if pid not in present:
                shutil.rmtree(self._procs_written.pop(pid).pid_dir, ignore_errors=True)
        for pid, process in present.items():
            # A new job on a reused PID is a new process: a new start time.
            start = 1000 + int.from_bytes(
                hashlib.blake2b(f"{pid}/{process.job_id}".encode(), digest_size=4).digest(), "big"
            )
            written = self._procs_written.get(pid)
            if written is not None and written.start_ticks == start:
                continue
            pid_dir = self.proc_root / str(pid)
            pid_dir.mkdir(parents=True, exist_ok=True)
            comm = process.name[:15]
            (pid_dir / "comm").write_text(comm + "\n")
            (pid_dir / "cgroup").write_text(process.cgroup + "\n")
            (pid_dir / "environ").write_bytes(
                b"".join(f"{k}={v}".encode() + b"\0" for k, v in process.env.items())
            )
            (pid_dir / "stat").write_text(
                f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 "
                f"{start}{_STAT_TAIL}\n"
            )
            self._procs_written[pid] = _Written(start, pid_dir)
