#!/usr/bin/env bash
# Create (or update) the read-only analyst user on a ClickHouse server.
#
#   GPULEDGER_ANALYST_PASSWORD_FILE=/run/secrets/analyst_password ./create_analyst_user.sh
#
# The password comes from a secret file (never an argument, never this repository); only its
# SHA-256 reaches the server. clickhouse-client connects as an administrator the usual way:
# its config file, or CLICKHOUSE_HOST / CLICKHOUSE_USER / CLICKHOUSE_PASSWORD in the
# environment. Extra arguments go to clickhouse-client (e.g. --host ch.internal --secure).
# With --dry-run first, it prints the statements instead of running them.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
user="${GPULEDGER_ANALYST_USER:-gpuledger_analyst}"
secret="${GPULEDGER_ANALYST_PASSWORD_FILE:?set GPULEDGER_ANALYST_PASSWORD_FILE to a file that holds the password}"

if [[ ! "$user" =~ ^[A-Za-z_][A-Za-z0-9_]{0,63}$ ]]; then
  echo "GPULEDGER_ANALYST_USER must be letters, digits and _ (got '$user')" >&2
  exit 2
fi
if [[ ! -r "$secret" ]]; then
  echo "cannot read the password file $secret" >&2
  exit 2
fi
# The file's first line, without its newline; a password of fewer than 12 characters is refused.
password="$(head -n 1 "$secret" | tr -d '\r\n')"
if (( ${#password} < 12 )); then
  echo "the password in $secret is shorter than 12 characters; use a longer one" >&2
  exit 2
fi
hash="$(printf '%s' "$password" | sha256sum | cut -d ' ' -f 1)"
unset password
if [[ ! "$hash" =~ ^[0-9a-f]{64}$ ]]; then
  echo "sha256sum gave no hash; is coreutils installed?" >&2
  exit 2
fi

# Only a checked name and a hex digest are put into the statements.
user_sql="CREATE USER IF NOT EXISTS ${user} IDENTIFIED WITH sha256_hash BY '${hash}';
GRANT gpuledger_reader TO ${user};
ALTER USER ${user} IDENTIFIED WITH sha256_hash BY '${hash}'
    DEFAULT ROLE gpuledger_reader SETTINGS PROFILE 'gpuledger_reader_profile';"

if (( dry_run )); then
  cat "$here/analyst_reader.sql"
  printf '%s\n' "$user_sql"
  exit 0
fi
clickhouse-client "$@" --multiquery < "$here/analyst_reader.sql"
clickhouse-client "$@" --multiquery --query "$user_sql"
echo "user ${user}: read-only on database gpuledger (role gpuledger_reader)"
