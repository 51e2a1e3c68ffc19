#!/usr/bin/env bash
# CPU instructions per transaction of the hot paths and their baselines, counted by valgrind's
# callgrind in the server backend that ran them: the same figure on every run, where pgbench's
# transactions per second on a small shared VM move by ±15 % from run to run. One psql session
# runs N + 1 statements of each of bench.sh's pgbench scripts (scripts/bench/, each statement its
# own transaction), minus a session of one (connection set-up and first-use caches), over N. A ratio is
# baseline / measure: the throughput a CPU-bound server would reach relative to the baseline
# (the pgbench client and the kernel are not counted).
# Usage: scripts/bench_instructions.sh [transactions per script, default 1000]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
N=${1:-1000}

scripts/setup.sh
command -v valgrind >/dev/null || {
    echo "bench_instructions: installing valgrind"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null
}
scripts/install.sh --release >/dev/null

DIR=/var/tmp/memory_ext_bench_instructions
PORT=${MEMORY_EXT_BENCH_PORT:-5494}
if cluster_running "$DIR/data" 2>/dev/null; then cluster_ctl "$DIR/data" stop; fi
rm -rf "$DIR"; mkdir -p "$DIR/cg"; chown -R postgres:postgres "$DIR"
# bench_api is not served (the worker idles in postgres); no autovacuum process to count
cluster_init "$DIR/data" "$PORT" "shared_buffers = '256MB'" "autovacuum = off" \
    "memory_ext.database = 'postgres'"
cluster_ctl "$DIR/data" start
W=$(mktemp -d); chown postgres "$W"   # psql reads its input and writes its output as postgres
trap 'cluster_ctl "$DIR/data" stop 2>/dev/null || true; rm -rf "$W"' EXIT
psql_i() { psql -h "$DIR/data" -p "$PORT" -U postgres -X -q -v ON_ERROR_STOP=1 -At "$@"; }
psql_i -d postgres -c "CREATE DATABASE bench_api"
psql_i -d bench_api -f - < scripts/bench/setup.sql >/dev/null
# every chat and conversation exists and has memory, as in a steady state
psql_i -d bench_api <<'SQL' >/dev/null
INSERT INTO public.messages_watched (conversation_id, user_id, role, content)
SELECT 'conv' || g, 'user' || g, 'user', 'confirmed: seen = yes' FROM generate_series(0, 999) g;
SELECT count(*) FROM (SELECT memory.enqueue('chat' || g, 'confirmed: plan = PPO') FROM generate_series(0, 999) g) x;
SET memory_ext.batch_chats = 1000; SET memory_ext.batch_snippets = 10000;
SELECT memory.process_pending(5000);
VACUUM ANALYZE;
SQL
pending=$(psql_i -d bench_api -c "SELECT count(*) FROM memory.chat_context_queue WHERE status <> 'complete'")
[[ $pending == 0 ]] || { echo "bench_instructions: $pending snippets left unapplied" >&2; exit 1; }
cluster_ctl "$DIR/data" stop

as_postgres valgrind --tool=callgrind --trace-children=yes \
    --callgrind-out-file="$DIR/cg/%p.out" "$PG_BIN/postgres" -D "$DIR/data" > "$DIR/valgrind.log" 2>&1 &
SERVER=$!
trap 'as_postgres "$PG_BIN/pg_ctl" -D "$DIR/data" stop -m fast >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
for _ in $(seq 120); do
    pg_isready -q -h "$DIR/data" -p "$PORT" -U postgres -d postgres && break
    kill -0 "$SERVER" 2>/dev/null || { echo "bench_instructions: the server under valgrind exited (see $DIR/valgrind.log)" >&2; exit 1; }
    sleep 1
done

# The statements of a pgbench script, n times, with ids 0, 7, 14, ... (mod 1000) for its :id:
# one psql session, one backend, the same statements on every run.
statements() { # script n
    awk -v n="$2" '!/^\\/ { for (i = 0; i < n; i++) { s = $0; gsub(/:id/, (i * 7) % 1000, s); print s } }' \
        "scripts/bench/$1.sql"
}
# A backend writes its counts to <pid>.out when it exits, after its client has gone.
instructions() { # script n -> instructions of the backend that ran n transactions of it
    local pid
    { echo "SELECT pg_backend_pid();"; statements "$1" "$2"; } > "$W/run.sql"
    as_postgres psql -h "$DIR/data" -p "$PORT" -U postgres -X -q -At -v ON_ERROR_STOP=1 \
        -d bench_api -f "$W/run.sql" -o "$W/out"
    pid=$(head -1 "$W/out")
    for _ in $(seq 600); do
        [[ -f $DIR/cg/$pid.out ]] && grep -q '^totals:' "$DIR/cg/$pid.out" && break
        sleep 0.5
    done
    awk '/^totals:/ {print $2}' "$DIR/cg/$pid.out"
}
# the first session after a start rebuilds the relation cache's init files: not one to count
instructions select 1 > /dev/null
declare -A per_tx
for s in select get context minimal insert enqueue messages_plain messages_watched; do
    one=$(instructions "$s" 1)
    many=$(instructions "$s" $((N + 1)))
    per_tx[$s]=$(( (many - one) / N ))
    echo "bench_instructions: $s ${per_tx[$s]} instructions per transaction"
done
row() { # label measure baseline-label baseline target
    awk -v l="$1" -v m="${per_tx[$2]}" -v bl="$3" -v b="${per_tx[$4]}" -v t="$5" \
        'BEGIN { printf "| %s | %.0fk | %s: %.0fk | %.2f | %s |\n", l, m / 1000, bl, b / 1000, b / m, t }'
}

cat <<REPORT

memory_ext instructions per transaction (callgrind, server backend, 1 client, $N transactions) — $(date -u +%Y-%m-%d), PostgreSQL $(psql_i -d postgres -c "SHOW server_version"), release build
| measure | memory_ext | baseline | baseline / measure | target (bench.sh) |
|---|---|---|---|---|
$(row "get()" get "PK SELECT" select ">= 0.80")
$(row "context()" context "get()" get ">= 0.90")
$(row "enqueue" enqueue "minimal insert" minimal ">= 0.50")
$(row "enqueue" enqueue "plain INSERT" insert ">= 0.80")
$(row "INSERT into a watched table" messages_watched "unwatched" messages_plain ">= 0.70")
REPORT
