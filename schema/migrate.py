"""Ordered ClickHouse migrations: the files `schema/clickhouse/NNN_name.sql`, applied in order,
each once, recorded in `gpuledger.schema_migrations` (version, name, checksum, applied_at).

`migrate(client)` is safe to run again: a second run applies nothing. A file changed after it
was applied stops the run with an error naming it; the change belongs in a new file.
ClickHouse has no transactional DDL, so a file is recorded only after all its statements ran,
and every statement is written to be idempotent (`IF NOT EXISTS`, `CREATE OR REPLACE VIEW`):
a run cut short in the middle of a file is finished by the next one.

File format: statements end with `;` at the end of a line; `--` comments are dropped.

SQL that several files say alike is said once, in `fragments/NAME.sql` (its leading `--` lines
describe it and are left out), and a file names it as `${NAME}`: the fragment's text stands
there, its later lines indented as the placeholder's line is. A file listed in RENDERINGS is
then a template (`string.Template`) rendered once per mapping. A file's checksum is that of
the text that runs (fragments included), so editing a fragment changes every applied file
that names it, and is refused as such an edit is.

Views are not migrations: each has a file of its own in `views/` (`CREATE OR REPLACE VIEW`),
and every run re-creates them all after the numbered files, each after the views it reads.
The SQL files are package data (`importlib.resources`), so this works from a wheel too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from importlib.resources.abc import Traversable
from string import Template
from typing import Any, Protocol

from gpuledger.schema.cluster import DATABASE, LOCAL_SUFFIX, ClusterError, on_cluster_all

LEDGER = f"{DATABASE}.schema_migrations"
FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
VIEW_NAME = re.compile(r"^([a-z0-9_]+)\.sql$")
PLACEHOLDER = re.compile(r"\$\{([a-z0-9_]+)\}")

# Files that are templates, rendered once per mapping (`${name}` placeholders) and applied as
# the rendered texts one after the other: the two rollups differ only in bucket and partition.
RENDERINGS: dict[str, tuple[dict[str, str], ...]] = {
    "004_rollups.sql": (
        {"rollup": "cost_minute", "bucket": "toStartOfMinute", "partition": "toDate"},
        {"rollup": "cost_hour", "bucket": "toStartOfHour", "partition": "toYYYYMM"},
    ),
}

# The texts these files had before: before the views they declared moved to views/, their
# comments were rewritten, 004's two rollups became one template, and 040's and 077's rollup
# queries took their shared parts from fragments/ (the same columns, in another order): a
# database that applied one of them still matches it.
EARLIER_CHECKSUMS: dict[str, frozenset[str]] = {
    name: frozenset(digests)
    for name, digests in {
        "001_cost_facts.sql": ("e4fe009ea6f338168235151f23f33a113ea81e9a7ae238b3b04953ac80f823e9",),
        "002_samples_and_metadata.sql": (
            "3683fa5d72d1236b3f222af29c02f1036fd2ff3475dcc36936fd2e0672a97af2",
        ),
        "003_alerts_and_deadletters.sql": (
            "3373155efc511d7839132db6bd7c8e3ef68aa97ebb54bce012d8ceb9e6d0a3a7",
        ),
        "004_rollups.sql": ("f46cf3ec85c0f69c5d40582470dd7b1ea950801d6956763eb6ae81d03e0d6f38",),
        "005_analyst_views.sql": (
            "c17f91508693f6a03868a2a5a8e16d2c2256800927269e60e6175bdc86f30553",
        ),
        "010_analyst_questions.sql": (
            "085da11e52bb69470a7019f3f0653097538d433808a97c68630fc6cc195fd67f",
        ),
        "011_recommendations.sql": (
            "b155acea2e4cc5be1e211eb4712a7919096cc8ce7bd6677b74a8cbe00f4b34f2",
        ),
        "020_alert_rules_and_budgets.sql": (
            "e1db6a0e02b14ae6a4e7fed12d595982c1a08905a917e695fedc0fbca1989857",
        ),
        "040_job_gpu_hour.sql": (
            "16feefcb636fd0ea34e63bf8647d384342b92ccaffab60726e164fbf3761e9c5",
            "58512cd861c7eb1aec164d4e62402df6130d3d12e0b4615cb4648bd47482791a",
        ),
        "045_effective_cost_unpriced.sql": (
            "9ceeb89a8b1f7fe1ca94c851733d794aaea60df8856d3aa70c822375f388bd48",
        ),
        "077_model_environment.sql": (
            "ac1ab9a710de12b8100c6d25a47cd42b675356e857c6d76cafb12e2405dff1ab",
        ),
    }.items()
}


_CLUSTERS = "SELECT DISTINCT cluster FROM system.clusters"


class MigrationError(RuntimeError):
    """The migrations cannot be applied as they stand; the message says what to do."""


class _Result(Protocol):
    @property
    def result_rows(self) -> Any: ...


class SqlClient(Protocol):
    """What the runner needs of a clickhouse-connect `Client`."""

    def command(self, cmd: str) -> Any: ...

    def query(self, query: str) -> _Result: ...


@dataclass(frozen=True)
class Migration:
    """One SQL file of `schema/clickhouse/`."""

    version: int
    name: str
    sql: str

    @property
    def filename(self) -> str:
        return f"{self.version:03d}_{self.name}.sql"

    @property
    def checksum(self) -> str:
        return checksum(self.sql)

    def statements(self, cluster: str | None = None) -> list[str]:
        """The statements to run: as written, or rewritten for `cluster`."""
        return statements_for(self.sql, cluster)


@dataclass(frozen=True)
class AppliedMigration:
    """One row of `gpuledger.schema_migrations`."""

    version: int
    name: str
    checksum: str
    applied_at: datetime

    @property
    def filename(self) -> str:
        return f"{self.version:03d}_{self.name}.sql"


def checksum(sql: str) -> str:
    """sha256 of the file text; line endings normalised so a CRLF checkout does not differ."""
    return hashlib.sha256(sql.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def split_statements(sql: str) -> list[str]:
    """The statements of a migration file: `--` comments removed, split at a `;` that ends a
    line. Quotes are respected, so `--` or `;` inside a string literal stay where they are."""
    statements: list[str] = []
    current: list[str] = []
    quote = ""  # the quote character of the literal or identifier we are in, if any
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if quote:
            current.append(ch)
            if ch == "\\" and i + 1 < n:
                current.append(sql[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = ""
            i += 1
            continue
        if ch in "'\"`":
            quote = ch
            current.append(ch)
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch == ";" and _rest_of_line_is_blank(sql, i + 1):
            _finish(current, statements)
        else:
            current.append(ch)
        i += 1
    if quote:
        raise MigrationError(f"unterminated {quote} quote; close it before the end of the file")
    _finish(current, statements)
    return statements


def _rest_of_line_is_blank(sql: str, start: int) -> bool:
    end = sql.find("\n", start)
    rest = sql[start : len(sql) if end < 0 else end]
    stripped = rest.strip()
    return not stripped or stripped.startswith("--")


def _finish(current: list[str], statements: list[str]) -> None:
    text = "".join(current).strip()
    current.clear()
    if text:
        statements.append(text)


def shipped_dir() -> Traversable:
    """`schema/clickhouse/` as installed (a folder, or inside a wheel or zip)."""
    return files("gpuledger.schema") / "clickhouse"


def available(directory: Traversable | None = None) -> list[Migration]:
    """The migration files in `directory` (default: those shipped), in version order."""
    found: dict[int, Migration] = {}
    parts = fragments(directory)
    for entry in (directory or shipped_dir()).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(
                f"migration file {entry.name!r} is not named NNN_name.sql (three digits, "
                "then lower-case letters, digits and _); rename it"
            )
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"migration files {found[version].filename!r} and {entry.name!r} share version "
                f"{version:03d}; give the newer one the next free number"
            )
        text = render(entry.name, entry.read_text(encoding="utf-8"), parts)
        found[version] = Migration(version, match.group(2), text)
    return [found[v] for v in sorted(found)]


def fragments(directory: Traversable | None = None) -> dict[str, str]:
    """The files of `fragments/` in `directory` (default: those shipped) by name, each
    without its leading `--` lines."""
    folder = (directory or shipped_dir()) / "fragments"
    if not folder.is_dir():
        return {}
    found: dict[str, str] = {}
    for entry in folder.iterdir():
        match = VIEW_NAME.match(entry.name)
        if match:
            lines = entry.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
            while lines and lines[0].startswith("--"):
                lines.pop(0)
            found[match.group(1)] = "\n".join(lines).strip()
    return found


def include(text: str, parts: Mapping[str, str]) -> str:
    """`text` with each `${name}` of `parts` replaced by its text, the lines after the first
    indented as the placeholder's line is; other placeholders are left as they are."""

    def included(line: str) -> str:
        indent = "\n" + line[: len(line) - len(line.lstrip())]
        return PLACEHOLDER.sub(
            lambda m: parts[m[1]].replace("\n", indent) if m[1] in parts else m[0], line
        )

    return "\n".join(included(line) for line in text.split("\n"))


def render(filename: str, text: str, parts: Mapping[str, str] | None = None) -> str:
    """The text to apply for `filename`: its fragments (`parts`, default: those shipped)
    included, then, for a template of RENDERINGS, rendered per mapping; an earlier, plain text
    of a template as it is."""
    template = Template(include(text, fragments() if parts is None else parts))
    mappings = RENDERINGS.get(filename, ())
    names = template.get_identifiers()
    unknown = [n for n in names if not mappings or any(n not in m for m in mappings)]
    if unknown:
        raise MigrationError(
            f"{filename} names {', '.join(unknown)}, which is no file of fragments/ and no "
            "placeholder of RENDERINGS; add the fragment or correct the name"
        )
    if not names:
        return template.template
    return "\n".join(template.substitute(mapping) for mapping in mappings)


def _ledger_exists(client: SqlClient) -> bool:
    rows = client.query(
        f"SELECT count() FROM system.tables WHERE database = '{DATABASE}' "
        "AND name = 'schema_migrations'"
    ).result_rows
    return bool(rows and rows[0][0])


def applied(client: SqlClient) -> list[AppliedMigration]:
    """The migrations recorded as applied, in version order (empty on a fresh server)."""
    if not _ledger_exists(client):
        return []
    rows = client.query(
        f"SELECT version, name, checksum, applied_at FROM {LEDGER} ORDER BY version"
    ).result_rows
    return [AppliedMigration(int(v), str(name), str(digest), at) for v, name, digest, at in rows]


def _plan(shipped: list[Migration], done: list[AppliedMigration]) -> list[Migration]:
    """The shipped migrations still to apply, after checking the applied ones are unchanged."""
    by_version = {m.version: m for m in shipped}
    for record in done:
        migration = by_version.get(record.version)
        if migration is None:
            raise MigrationError(
                f"migration {record.filename} is applied in the database but this gpuledger "
                "does not ship it; run a gpuledger that does (a newer one), or restore the file"
            )
        if migration.name != record.name:
            raise MigrationError(
                f"migration version {record.version:03d} was applied as {record.filename} but "
                f"the file is now {migration.filename}; restore the old name and put the "
                "change in a new file"
            )
        earlier = EARLIER_CHECKSUMS.get(migration.filename, frozenset())
        if migration.checksum != record.checksum and record.checksum not in earlier:
            raise MigrationError(
                f"migration {migration.filename} changed after it was applied (checksum "
                f"{record.checksum[:12]}… applied, {migration.checksum[:12]}… now); an applied "
                "migration must never change: revert the edit and put the change in a new "
                "file (see schema/clickhouse/README.md)"
            )
    done_versions = {record.version for record in done}
    return [m for m in shipped if m.version not in done_versions]


def pending(client: SqlClient, directory: Traversable | None = None) -> list[str]:
    """The file names `migrate` would apply now, in order (checks the applied ones too)."""
    return [m.filename for m in _plan(available(directory), applied(client))]


def statements_for(sql: str, cluster: str | None) -> list[str]:
    """The statements to run for a file's text: as written, or rewritten for `cluster`."""
    statements = split_statements(sql)
    if cluster is None:
        return statements
    try:
        return on_cluster_all(statements, cluster)
    except ClusterError as exc:
        raise MigrationError(str(exc)) from exc


def require_current(client: SqlClient, cluster: str) -> None:
    """Refuse a store whose cluster schema is missing or behind this gpuledger's files."""
    _check_layout(client, cluster)
    waiting = pending(client)
    if waiting:
        raise MigrationError(
            f"the cluster's schema lacks {len(waiting)} migration(s) ({', '.join(waiting)}); "
            f"run `gpuledger db migrate --cluster {cluster}` once, then start the workers"
        )


def _apply(client: SqlClient, migration: Migration, cluster: str | None) -> None:
    for number, statement in enumerate(migration.statements(cluster), start=1):
        try:
            client.command(statement)
        except Exception as exc:
            raise MigrationError(
                f"migration {migration.filename}, statement {number} failed: {exc}; the "
                "statements before it ran and are idempotent: fix the cause and migrate again"
            ) from exc


def _check_cluster(client: SqlClient, cluster: str) -> None:
    """Refuse a cluster this server does not know, before any statement runs."""
    known = sorted(str(row[0]) for row in client.query(_CLUSTERS).result_rows)
    if cluster not in known:
        raise MigrationError(
            f"this server knows no cluster {cluster!r} (its remote_servers: "
            f"{', '.join(known) or 'none'}); name one of them, or define it in the servers' "
            "configuration (deploy/clickhouse/cluster/ has an example)"
        )


def _check_layout(client: SqlClient, cluster: str | None) -> None:
    """Refuse to migrate a database laid out for one server as a cluster, or the reverse:
    the rewritten statements would create a second, different set of tables."""
    rows = client.query(
        f"SELECT name FROM system.tables WHERE database = '{DATABASE}' "
        f"AND name IN ('cost_facts', 'cost_facts{LOCAL_SUFFIX}')"
    ).result_rows
    names = {str(row[0]) for row in rows}
    if "cost_facts" not in names:
        return  # a fresh database: either layout may begin
    sharded = f"cost_facts{LOCAL_SUFFIX}" in names
    if cluster is not None and not sharded:
        raise MigrationError(
            f"{DATABASE} on this server was created for one server (no cost_facts"
            f"{LOCAL_SUFFIX}); a cluster's schema is created on an empty database: "
            "migrate without --cluster, or start the cluster on new servers"
        )
    if cluster is None and sharded:
        raise MigrationError(
            f"{DATABASE} on this server is laid out for a cluster (cost_facts{LOCAL_SUFFIX} "
            "exists): migrate with --cluster NAME, the cluster it was created on"
        )


def _record(client: SqlClient, migration: Migration) -> None:
    # INSERT … SELECT, not VALUES: a plain statement for every HTTP front end. The name is
    # checked against FILE_NAME and the checksum is hex, so both are safe as literals.
    client.command(
        f"INSERT INTO {LEDGER} (version, name, checksum, applied_at) "
        f"SELECT {migration.version}, '{migration.name}', '{migration.checksum}', "
        "now64(3, 'UTC')"
    )


def migrate(
    client: SqlClient, directory: Traversable | None = None, *, cluster: str | None = None
) -> list[str]:
    """Apply, in order, the migrations not yet applied; return their file names.

    `directory` defaults to the files shipped in `schema/clickhouse/`. With `cluster`, every
    statement is rewritten to run `ON CLUSTER` (`gpuledger.schema.cluster`).
    """
    shipped = available(directory)
    if not shipped:
        raise MigrationError(
            f"no migration files in {directory or 'schema/clickhouse'}; reinstall gpuledger"
        )
    if cluster is not None:
        _check_cluster(client, cluster)
    _check_layout(client, cluster)
    if not _ledger_exists(client):
        _apply(client, shipped[0], cluster)  # the first file creates the database and the ledger
        if not _ledger_exists(client):
            raise MigrationError(
                f"{shipped[0].filename} ran but {LEDGER} does not exist; the first migration "
                "must create it"
            )
    done: list[str] = []
    for migration in _plan(shipped, applied(client)):
        _apply(client, migration, cluster)
        _record(client, migration)
        done.append(migration.filename)
    apply_views(client, directory, cluster=cluster)
    return done


def script(directory: Traversable | None = None, *, cluster: str | None = None) -> str:
    """Every statement `migrate` runs on an empty database (views included), as one SQL text;
    the ledger's records left out."""
    parts: list[str] = []
    for migration in available(directory):
        parts.append(f"-- {migration.filename}")
        parts += [f"{s};" for s in migration.statements(cluster)]
    for view in views(directory):
        parts.append(f"-- views/{view.name}.sql")
        parts += [f"{s};" for s in statements_for(view.sql, cluster)]
    return "\n\n".join(parts) + "\n"


@dataclass(frozen=True)
class View:
    """One file of `schema/clickhouse/views/`: a view, re-created on every run."""

    name: str
    sql: str

    def reads(self, names: set[str]) -> set[str]:
        """The views among `names` that this one selects from."""
        return {n for n in names if n != self.name and re.search(rf"\b{DATABASE}\.{n}\b", self.sql)}


def views(directory: Traversable | None = None) -> list[View]:
    """The view files, each after the views it reads (a cycle is refused)."""
    folder = (directory or shipped_dir()) / "views"
    if not folder.is_dir():
        return []
    found: dict[str, View] = {}
    for entry in folder.iterdir():
        match = VIEW_NAME.match(entry.name)
        if match:
            found[match.group(1)] = View(match.group(1), entry.read_text(encoding="utf-8"))
    ordered: list[View] = []
    waiting = dict(sorted(found.items()))
    while waiting:
        ready = [v for v in waiting.values() if not v.reads(set(waiting))]
        if not ready:
            raise MigrationError(f"the views {', '.join(waiting)} read one another in a cycle")
        for view in ready:
            ordered.append(waiting.pop(view.name))
    return ordered


def apply_views(
    client: SqlClient, directory: Traversable | None = None, *, cluster: str | None = None
) -> None:
    """Re-create every view from its file (all are `CREATE OR REPLACE VIEW`)."""
    for view in views(directory):
        for statement in statements_for(view.sql, cluster):
            try:
                client.command(statement)
            except Exception as exc:
                raise MigrationError(
                    f"view {view.name} (views/{view.name}.sql) failed: {exc}; the tables it "
                    "reads are those of the numbered migrations: fix the view and migrate again"
                ) from exc
