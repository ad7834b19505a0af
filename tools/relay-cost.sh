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

sql() { psql "$pg/$1" -q -At -v ON_ERROR_STOP=1 -c "$2"; }

cleanup() {
    if [[ -n $relay_pid ]]; then kill -INT "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; fi
    sql postgres "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
    if [[ $broker == nats://* ]]; then
        # Delete the scratch channel's stream through the JetStream API.
        local hostport=${broker#nats://}
        if exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}"; then
            printf 'CONNECT {"verbose":false}\r\nSUB _INBOX.relaycost 1\r\nPUB $JS.API.STREAM.DELETE.COURIER_%s _INBOX.relaycost 0\r\n\r\n' "$channel" >&3
            # The answer, or give up after 5 s.
            timeout 5 grep -q -m1 stream_delete_response <&3 || echo "relay-cost: could not delete the stream COURIER_$channel" >&2
            exec 3>&-
        fi
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Wait until command "$@" succeeds, at most $deadline seconds.
wait_for() {
    local deadline=$1; shift
    local end=$((SECONDS + deadline))
    until "$@"; do
        ((SECONDS < end)) || return 1
        sleep 0.2
    done
}

sql postgres "CREATE DATABASE $db"
url="$pg/$db"

# A first relay creates Courier's tables; stop it once it is active.
"$courier" relay --db "$url" --broker "$broker" >"$work/init.log" 2>&1 &
relay_pid=$!
wait_for 60 grep -q "relay is active" "$work/init.log" || die "the relay did not start: $(tail -3 "$work/init.log")"
kill -INT "$relay_pid"; wait "$relay_pid" || true; relay_pid=""

headers="{\"content-type\":\"application/json\",\"created-at\":\"1763942400000\",\"destination\":\"$channel\",\"message-type\":\"event\",\"partition-key\":\"key-' || (g % 1000) || '\",\"type\":\"bench.Sample\",\"type-version\":\"1\"}"
sql "$db" "INSERT INTO courier_outbox (message_id, channel, headers, payload, created_at)
    SELECT gen_random_uuid()::text, '$channel', '$headers', decode(repeat('07', 200), 'hex'), 1763942400000
    FROM generate_series(1, $rows) g"
sql "$db" "VACUUM ANALYZE courier_outbox"

echo "relay-cost: relaying $rows rows to $broker under callgrind (about 50 times slower than native)" >&2
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" --log-file="$work/valgrind.log" \
    "$courier" relay --db "$url" --broker "$broker" >"$work/relay.log" 2>&1 &
relay_pid=$!
empty() { [[ $(sql "$db" "SELECT count(*) FROM courier_outbox") == 0 ]]; }
wait_for $((60 + rows / 200)) empty || die "the outbox was not drained in time: $(tail -3 "$work/relay.log")"
kill -INT "$relay_pid"; wait "$relay_pid" || true; relay_pid=""

total=$(grep -o "Collected : [0-9]*" "$work/valgrind.log" | grep -o "[0-9]*$") || die "no callgrind total in $work/valgrind.log"
echo "instructions: $total for $rows messages, $((total / rows)) per message (start-up included)"
