#!/usr/bin/env bash
# The capture benchmark side by side with PostgreSQL doing the same work: per capture, one
# durable commit that marks the coupon used (only if it is still valid) and inserts the
# dose (unique event id, one dose per coupon), with 64 concurrent clients against 1 M
# coupons. Prints both rates and the ratio. Installs PostgreSQL if it is missing.
#
#   scripts/bench-postgres.sh            # both: vrs-node (1 M residents) and PostgreSQL
#   scripts/bench-postgres.sh --pg-only  # PostgreSQL alone
#
# VRS_BENCH_DIR (default /var/tmp/vrs-bench) keeps the 1 M node between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=64
CAPTURES=50000
ROWS=1000000
NODE_DIR="${VRS_BENCH_DIR:-/var/tmp/vrs-bench}"
PG_DIR="${VRS_PG_DIR:-/var/tmp/vrs-bench-pg}"
PORT=55432

say() { printf '== %s\n' "$*"; }

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [[ -z "$(pg_bin)" || ! -x "$(pg_bin)/initdb" ]] || ! command -v pgbench >/dev/null; then
  say "installing PostgreSQL"
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql postgresql-contrib >/dev/null
fi
BIN="$(pg_bin)"

# Run PostgreSQL's server tools as `postgres` when we are root (initdb refuses root).
as_pg() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

vrs_rate=""
if [[ "${1:-}" != "--pg-only" ]]; then
  # The profile a municipality deploys (Cargo.toml).
  cargo build --profile production --locked -p node -p tests --bins
  if [[ ! -d "$NODE_DIR" ]]; then
    say "building a 1 M-resident node in $NODE_DIR"
    ./target/production/vrs-bench import --residents "$ROWS" --keep "$NODE_DIR"
  fi
  say "vrs-node: $CLIENTS clients, $CAPTURES captures"
  out="$(./target/production/vrs-bench capture --data "$NODE_DIR" --clients "$CLIENTS" --captures "$CAPTURES" | tee >(cat >&2))"
  vrs_rate="$(sed -n 's/^durable captures\/s: \([0-9]*\).*/\1/p' <<<"$out")"
fi

say "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}'): cluster in $PG_DIR"
as_pg "$BIN/pg_ctl" -D "$PG_DIR" stop -m fast >/dev/null 2>&1 || true
rm -rf "$PG_DIR"
mkdir -p "$PG_DIR"
[[ $(id -u) -eq 0 ]] && chown postgres "$PG_DIR"
as_pg "$BIN/initdb" -D "$PG_DIR" -U postgres --auth=trust >/dev/null
# Durable commits: fsync and synchronous_commit on (the defaults), nothing relaxed.
as_pg "$BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w start -o \
  "-p $PORT -k $PG_DIR -c listen_addresses='' -c max_connections=200 -c shared_buffers=512MB -c fsync=on -c synchronous_commit=on" >/dev/null
trap 'as_pg "$BIN/pg_ctl" -D "$PG_DIR" stop -m fast >/dev/null 2>&1 || true' EXIT
# CPU ticks (user + system) of the server: the postmaster with the children it has reaped,
# and its children still running (checkpointer, WAL writer, …).
pg_cpu_ticks() {
  local postmaster
  postmaster="$(head -n 1 "$PG_DIR/postmaster.pid")"
  # A process may exit between the glob and awk opening its file: awk then skips it and
  # exits 2, which is not a failure here.
  { awk -v pm="$postmaster" '
    FNR == 1 { sub(/^.*\) /, ""); if ($2 == pm) live += $12 + $13 }
    END { print live }' /proc/[0-9]*/stat 2>/dev/null || true; } | {
    read -r live
    awk -v live="$live" '{sub(/^.*\) /, ""); print live + $12 + $13 + $14 + $15}' "/proc/$postmaster/stat"
  }
}
psql_() { psql -X -q -h "$PG_DIR" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }

psql_ -c "CREATE DATABASE vrs"
psql_ -d vrs <<SQL
CREATE TABLE coupons (
  number      bigint PRIMARY KEY,
  resident_id bigint NOT NULL,
  status      text   NOT NULL CHECK (status IN ('valid', 'used', 'superseded', 'revoked'))
);
CREATE TABLE doses (
  event_id      uuid        PRIMARY KEY,
  coupon_number bigint      NOT NULL REFERENCES coupons (number),
  resident_id   bigint      NOT NULL,
  dose_number   smallint    NOT NULL,
  vaccinated_on date        NOT NULL,
  lot           text        NOT NULL,
  venue         text        NOT NULL,
  captured_at   timestamptz NOT NULL,
  UNIQUE (coupon_number),
  UNIQUE (resident_id, dose_number)
);
INSERT INTO coupons SELECT n, n, 'valid' FROM generate_series(1, $ROWS) AS n;
VACUUM ANALYZE coupons;
CREATE SEQUENCE pick;
SQL

cat > "$PG_DIR/capture.sql" <<'SQL'
WITH used AS (
  UPDATE coupons SET status = 'used'
  WHERE number = (SELECT nextval('pick')) AND status = 'valid'
  RETURNING number, resident_id
)
INSERT INTO doses (event_id, coupon_number, resident_id, dose_number, vaccinated_on, lot, venue, captured_at)
SELECT gen_random_uuid(), number, resident_id, 1, current_date, 'BENCH1', 'venue-1', now() FROM used;
SQL
chmod a+r "$PG_DIR/capture.sql"

say "PostgreSQL: $CLIENTS clients, $CAPTURES captures"
per_client=$(( CAPTURES / CLIENTS ))
logs="$(mktemp -d)"
server_before="$(pg_cpu_ticks)"
(cd "$logs" && /usr/bin/time -f '%U %S' -o "$logs/pgbench-cpu" \
  pgbench -n -h "$PG_DIR" -p "$PORT" -U postgres -c "$CLIENTS" -j 2 -t "$per_client" \
  -f "$PG_DIR/capture.sql" -l --log-prefix=tx vrs >"$logs/summary.txt" 2>&1) || { cat "$logs/summary.txt"; exit 1; }
sleep 1 # the backends have exited; the postmaster has reaped them into its children's time
server_cpu_s="$(awk -v a="$server_before" -v b="$(pg_cpu_ticks)" -v hz="$(getconf CLK_TCK)" 'BEGIN {print (b - a) / hz}')"
client_cpu_s="$(awk '{print $1 + $2}' "$logs/pgbench-cpu")"
pg_rate="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$logs/summary.txt" | head -n 1)"
# Per-transaction latencies (µs, third column of pgbench's log) → p50 and p99 in ms.
read -r p50 p99 < <(cat "$logs"/tx.* | awk '{print $3}' | sort -n |
  awk '{a[NR]=$1} END {printf "%.1f %.1f\n", a[int(NR*0.50)]/1000, a[int(NR*0.99)]/1000}')
recorded="$(psql_ -d vrs -At -c "SELECT count(*) FROM doses")"
rm -rf "$logs"
printf 'PostgreSQL durable captures/s: %.0f (p50 %s ms, p99 %s ms; %s doses stored)\n' "$pg_rate" "$p50" "$p99" "$recorded"
awk -v s="$server_cpu_s" -v c="$client_cpu_s" -v n="$recorded" \
  'BEGIN {printf "PostgreSQL CPU per capture: server %.0f µs, pgbench %.0f µs (user+system)\n", s / n * 1e6, c / n * 1e6}'
if [[ -n "$vrs_rate" ]]; then
  awk -v v="$vrs_rate" -v p="$pg_rate" 'BEGIN {printf "vrs-node durable captures/s: %d; ratio vrs-node / PostgreSQL = %.2f×\n", v, v / p}'
fi
