#!/usr/bin/env bash
# CPU time per message, per process, of raw JetStream publishes and of the relay
# (PostgreSQL -> NATS): the budget behind the relay target (see BENCHMARKS.md, "The relay
# target as a CPU budget"). On a machine where every process shares the same cores, a
# rate is at most cores / (CPU time per message, all processes together); comparing CPU
# per message compares what the rates can reach, with less noise than the rates.
#
# 1. Raw publishes, bare and with the relay's headers and Nats-Msg-Id (ROWS each): CPU of
#    the publishing client and of nats-server (the example raw_publish_cpu).
# 2. `courier relay` draining ROWS outbox rows like the bench's from a scratch database:
#    CPU of the relay process, of nats-server and of all PostgreSQL processes, from just
#    before the relay starts until the outbox is empty (start-up included).
# The scratch database and the NATS stream are removed afterwards.
#
# Needs: psql, a release build of the CLI and of the example
#   (cargo build --release -p courier-cli && cargo build --release -p courier-nats --example raw_publish_cpu),
#   PostgreSQL and nats-server running on this machine (their /proc entries are read).
#
# Usage: tools/cpu-per-message.sh [ROWS]        ROWS default 100000
# Environment: COURIER (default target/release/courier),
#   RAW (default target/release/examples/raw_publish_cpu),
#   PG (server URL without a database, default postgres://postgres@127.0.0.1),
#   BROKER (default nats://127.0.0.1:4222).
set -euo pipefail

rows=${1:-100000}
courier=${COURIER:-target/release/courier}
raw=${RAW:-target/release/examples/raw_publish_cpu}
pg=${PG:-postgres://postgres@127.0.0.1}
broker=${BROKER:-nats://127.0.0.1:4222}
db="courier_cpu_$$"
channel="cpu$$"
work=$(mktemp -d)
relay_pid=""

die() { echo "cpu-per-message: $*" >&2; exit 1; }
command -v psql >/dev/null || die "psql is not installed"
[[ -x $courier ]] || die "no CLI at $courier: build it with cargo build --release -p courier-cli, or set COURIER"
[[ -x $raw ]] || die "no $raw: build it with cargo build --release -p courier-nats --example raw_publish_cpu, or set RAW"
[[ $rows =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive whole number, got '$rows'"
nats_pid=$(pgrep -x nats-server | head -1) || die "no nats-server process on this machine"

# shellcheck source=tools/scratch-outbox.sh
source "$(dirname "${BASH_SOURCE[0]}")/scratch-outbox.sh"

# CPU seconds x 100 (clock ticks) of process $1, user + system; 0 once it is gone.
ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0; }

# "pid ticks" of every PostgreSQL process.
pg_ticks() { for p in $(pgrep -x postgres); do echo "$p $(ticks "$p")"; done; }

cleanup() {
    if [[ -n $relay_pid ]]; then kill -INT "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; fi
    drop_scratch "$db" "$broker" "$channel"
    rm -rf "$work"
}
trap cleanup EXIT

echo "raw publishes, $rows each:"
"$raw" "$nats_pid" bare "$rows" "$broker"
"$raw" "$nats_pid" headers "$rows" "$broker"

fill_scratch_outbox "$courier" "$db" "$broker" "$channel" "$rows" "$work" || die "could not fill the scratch outbox"
url="$pg/$db"

pg_ticks >"$work/pg0"
nats0=$(ticks "$nats_pid")
start=$(date +%s.%N)
"$courier" relay --db "$url" --broker "$broker" >"$work/relay.log" 2>&1 &
relay_pid=$!
wait_for $((60 + rows / 1000)) outbox_empty "$db" || die "the outbox was not drained in time: $(tail -3 "$work/relay.log")"
end=$(date +%s.%N)
relay=$(ticks "$relay_pid")
nats1=$(ticks "$nats_pid")
pg_ticks >"$work/pg1"
kill -INT "$relay_pid"; wait "$relay_pid" || true; relay_pid=""
# PostgreSQL processes that started meanwhile count from 0; ones that ended are lost
# (the polling psql sessions: not the relay's work).
pg_cpu=$(awk 'NR == FNR { before[$1] = $2; next } { sum += $2 - before[$1] } END { print sum }' "$work/pg0" "$work/pg1")
awk -v rows="$rows" -v relay="$relay" -v nats="$((nats1 - nats0))" -v pg="$pg_cpu" -v s="$start" -v e="$end" 'BEGIN {
    us = 1e6 / 100 / rows
    printf "relay, %d rows: %.0f msg/s (start-up included), CPU per message: relay %.2f us, nats-server %.2f us, PostgreSQL %.2f us, together %.2f us\n",
        rows, rows / (e - s), relay * us, nats * us, pg * us, (relay + nats + pg) * us
}'
