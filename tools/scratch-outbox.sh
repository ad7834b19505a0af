# Sourced by relay-cost.sh and cpu-per-message.sh: a scratch database whose outbox holds
# rows like the bench's, and its clean-up. Expects $pg (server URL without a database).

# Run statement $2 in database $1.
sql() { psql "$pg/$1" -q -At -v ON_ERROR_STOP=1 -c "$2"; }

# Wait until command "$@" succeeds, at most $1 seconds.
wait_for() {
    local deadline=$1; shift
    local end=$((SECONDS + deadline))
    until "$@"; do
        ((SECONDS < end)) || return 1
        sleep 0.1
    done
}

# fill_scratch_outbox COURIER DB BROKER CHANNEL ROWS WORKDIR
# Create database DB, let a first `courier relay` create Courier's tables, then insert
# ROWS outbox rows for CHANNEL (200-byte payload, the bench message's headers).
fill_scratch_outbox() {
    local courier=$1 db=$2 broker=$3 channel=$4 rows=$5 work=$6 pid
    sql postgres "CREATE DATABASE $db"
    "$courier" relay --db "$pg/$db" --broker "$broker" >"$work/init.log" 2>&1 &
    pid=$!
    if ! wait_for 60 grep -q "relay is active" "$work/init.log"; then
        kill -INT "$pid" 2>/dev/null || true
        echo "the relay did not start: $(tail -3 "$work/init.log")" >&2
        return 1
    fi
    kill -INT "$pid"; wait "$pid" || true
    local headers="{\"content-type\":\"application/json\",\"created-at\":\"1763942400000\",\"destination\":\"$channel\",\"message-type\":\"event\",\"partition-key\":\"key-' || (g % 1000) || '\",\"type\":\"bench.Sample\",\"type-version\":\"1\"}"
    sql "$db" "INSERT INTO courier_outbox (message_id, channel, headers, payload, created_at)
        SELECT gen_random_uuid()::text, '$channel', '$headers', decode(repeat('07', 200), 'hex'), 1763942400000
        FROM generate_series(1, $rows) g"
    sql "$db" "VACUUM ANALYZE courier_outbox"
}

# Whether the outbox of database $1 is empty.
outbox_empty() { [[ $(sql "$1" "SELECT count(*) FROM courier_outbox") == 0 ]]; }

# drop_scratch DB BROKER CHANNEL: drop the database and, on NATS, the channel's stream
# (through the JetStream API).
drop_scratch() {
    local db=$1 broker=$2 channel=$3
    sql postgres "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    [[ $broker == nats://* ]] || return 0
    local hostport=${broker#nats://}
    if exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}"; then
        printf 'CONNECT {"verbose":false}\r\nSUB _INBOX.scratch 1\r\nPUB $JS.API.STREAM.DELETE.COURIER_%s _INBOX.scratch 0\r\n\r\n' "$channel" >&3
        # The answer, or give up after 5 s.
        timeout 5 grep -q -m1 stream_delete_response <&3 || echo "could not delete the stream COURIER_$channel" >&2
        exec 3>&-
    fi
}
