#!/usr/bin/env bash
# The relay's own cost per message, as user-space instructions counted by callgrind:
# repeatable where timings on a shared 2-vCPU VM are not (see BENCHMARKS.md, "The
# relay's own cost per message").
#
# It creates a scratch PostgreSQL database, fills its outbox with ROWS messages like the
# bench's (200-byte payload, the bench message's headers), runs `courier relay` under
# `valgrind --tool=callgrind` until the outbox is empty, prints the instructions per
# message, and removes the database (and, on NATS, the scratch channel's stream).
#
# Needs: psql, valgrind, a release build of the CLI
# (cargo build --release -p courier-cli), PostgreSQL and the broker running.
#
# Usage: tools/relay-cost.sh [ROWS] [BROKER_URL]
#   ROWS        default 40000
#   BROKER_URL  default nats://127.0.0.1:4222
# Environment: COURIER (the binary, default target/release/courier),
#   PG (server URL without a database, default postgres://postgres@127.0.0.1).
set -euo pipefail

rows=${1:-40000}
broker=${2:-nats://127.0.0.1:4222}
courier=${COURIER:-target/release/courier}
pg=${PG:-postgres://postgres@127.0.0.1}
db="courier_relay_cost_$$"
channel="relaycost$$"
work=$(mktemp -d)
relay_pid=""

die() { echo "relay-cost: $*" >&2; exit 1; }
for tool in psql valgrind; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
[[ -x $courier ]] || die "no CLI at $courier: build it with cargo build --release -p courier-cli, or set COURIER"
[[ $rows =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive whole number, got '$rows'"

# shellcheck source=tools/scratch-outbox.sh
source "$(dirname "${BASH_SOURCE[0]}")/scratch-outbox.sh"

cleanup() {
    if [[ -n $relay_pid ]]; then kill -INT "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; fi
    drop_scratch "$db" "$broker" "$channel"
    rm -rf "$work"
}
trap cleanup EXIT

fill_scratch_outbox "$courier" "$db" "$broker" "$channel" "$rows" "$work" || die "could not fill the scratch outbox"
url="$pg/$db"

echo "relay-cost: relaying $rows rows to $broker under callgrind (about 50 times slower than native)" >&2
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" --log-file="$work/valgrind.log" \
    "$courier" relay --db "$url" --broker "$broker" >"$work/relay.log" 2>&1 &
relay_pid=$!
wait_for $((60 + rows / 200)) outbox_empty "$db" || die "the outbox was not drained in time: $(tail -3 "$work/relay.log")"
kill -INT "$relay_pid"; wait "$relay_pid" || true; relay_pid=""

total=$(grep -o "Collected : [0-9]*" "$work/valgrind.log" | grep -o "[0-9]*$") || die "no callgrind total in $work/valgrind.log"
echo "instructions: $total for $rows messages, $((total / rows)) per message (start-up included)"
