"""`gpuledger up`: the whole pipeline on embedded defaults, with the live board.

Parts run as child processes (the broker, the store, one worker, one simulated agent) so
that each behaves as it would deployed; they die with us (PR_SET_PDEATHSIG) even if we are
killed, and Ctrl-C stops them in order so that the worker stores what it holds.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.live import Live

from gpuledger.board import Board
from gpuledger.broker import ensure_topics
from gpuledger.children import die_with_parent
from gpuledger.runtime import (
    child_env,
    connect_store,
    gpuledger_argv,
    prices_topic_empty,
    publish_price_book,
    resolve_bootstrap,
)
from gpuledger.schema.migrate import migrate
from gpuledger.schema.topics import Topics
from gpuledger.settings import Settings
from gpuledger.store import terminate

DEMO_SCENARIO = Path(__file__).resolve().parent / "agents" / "scenarios" / "demo.toml"
# The demo's guardrail policy: dry runs on its idle notebook, a round every 10 s.
DEMO_POLICIES = DEMO_SCENARIO.with_name("demo-policies.toml")
DEMO_GUARD_CHECK_S = 10
# The demo flags its idle notebook within two minutes, not ten (unless the user set it).
DEMO_IDLE_ALERT_AFTER_S = 60


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log: IO[bytes] = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us; we stop them in order
            preexec_fn=die_with_parent,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float) -> int | None:
        terminate(self.proc, timeout_s)
        self.log.close()
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def store_line(settings: Settings, applied: int) -> str:
    """What `up` says about the store: where it is (never its password) and the migrations."""
    from gpuledger.store import redact_store_url

    return f"store    {redact_store_url(settings.store_url())} ({applied} migrations applied)"


def run_up(
    settings: Settings,
    *,
    scenario: Path | None = None,
    duration: float | None = None,
    board: bool = True,
) -> int:
    console = Console(stderr=True, soft_wrap=True)
    scenario = scenario or DEMO_SCENARIO
    if not scenario.exists():
        console.print(f"[red]scenario {scenario} not found[/red]")
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(exist_ok=True)

    with console.status("starting the broker…"):
        bootstrap, broker = resolve_bootstrap(settings, start=True)
        ensure_topics(bootstrap, Topics(settings.topic_prefix))
    console.print(f"broker   {bootstrap}" + (" (embedded, memory only)" if broker else ""))
    with console.status("starting the store and applying migrations…"):
        client = connect_store(settings)
        applied = migrate(client)
    console.print(store_line(settings, len(applied)))
    if prices_topic_empty(bootstrap, settings):
        entries = publish_price_book(settings, None)
        console.print(f"prices   published the default price book ({len(entries)} list prices)")

    env = child_env(settings, bootstrap)
    note = ""
    if scenario == DEMO_SCENARIO and "idle_alert_after_s" not in settings.model_fields_set:
        env["GPULEDGER_IDLE_ALERT_AFTER_S"] = str(DEMO_IDLE_ALERT_AFTER_S)
        note = (
            f"Demo: idle allocated GPUs alert after {DEMO_IDLE_ALERT_AFTER_S} s "
            "(default 600 s: GPULEDGER_IDLE_ALERT_AFTER_S). `gpuledger alerts` lists them.\n"
        )
    children: list[Child] = []
    try:
        children.append(Child("worker", gpuledger_argv("worker"), env, log_dir))
        children.append(
            Child("agent", gpuledger_argv("agent", "--simulate", str(scenario)), env, log_dir)
        )
        policies = settings.guard_policies or (DEMO_POLICIES if scenario == DEMO_SCENARIO else None)
        if policies is not None:
            guard_env = dict(env)
            if "guard_check_s" not in settings.model_fields_set:
                guard_env["GPULEDGER_GUARD_CHECK_S"] = str(DEMO_GUARD_CHECK_S)
            argv = gpuledger_argv("guard", "--policies", str(policies))
            children.append(Child("guard", argv, guard_env, log_dir))
            note += f"Guard: the policies of {policies} (dry runs unless a policy enforces).\n"
        console.print(f"worker and simulated agent started; logs in {log_dir}")
        return _watch(settings, client, children, duration, board, console, note)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_all(children, console)
        if broker is not None:
            broker.stop()
        with contextlib.suppress(Exception):
            from gpuledger.store import stop_owned_stores

            stop_owned_stores()
        console.print("stopped: no gpuledger process left running")


def _watch(
    settings: Settings,
    client: Any,
    children: list[Child],
    duration: float | None,
    board: bool,
    console: Console,
    note: str = "",
) -> int:
    deadline = None if duration is None else time.monotonic() + duration
    view = Board(client)
    view.note = (
        note + 'Ctrl-C stops everything. Query from another terminal: gpuledger query "SELECT …"'
    )

    def step() -> int | None:
        for child in children:
            if not child.alive():
                console.print(
                    f"[red]{child.name} exited with {child.proc.returncode}[/red]; "
                    f"its log ({child.log_path}):\n{child.tail()}"
                )
                return 1
        if deadline is not None and time.monotonic() >= deadline:
            return 0
        return None

    if not board:
        while (code := step()) is None:
            time.sleep(0.5)
        return code
    with Live(view.render(), console=Console(), refresh_per_second=2, screen=False) as live:
        while (code := step()) is None:
            time.sleep(1.0)
            live.update(view.render())
    return code


def _stop_all(children: list[Child], console: Console) -> None:
    # The agent first (no new samples), then the worker, which stores what it holds.
    for child in reversed(children):
        code = child.stop(timeout_s=60 if child.name == "worker" else 15)
        if code not in (0, -signal.SIGTERM, None):
            console.print(f"[yellow]{child.name} stopped with exit code {code}[/yellow]")
