#!/usr/bin/env bash
# The drain rate across sizes and table histories (mock summarizer, release build), on a scratch
# cluster: how many snippets per second one worker applies after a burst commits.
#   fresh    : the burst lands on tables whose statistics are those of the empty install
#              (autovacuum held off during the burst, as when a burst outruns it)
#   analyzed : the same burst, VACUUM ANALYZE before the worker starts
#   churned  : after CYCLES rounds of burst, drain and retention (deleting what was applied)
# Each burst is written with the worker paused (memory_ext.database points elsewhere): the rows
# enqueue() would leave (pending snippets, due chats), in bulk, so the time measured is the drain
# alone. Prints a table; the figures go into docs/benchmarks.md.
# Usage: scripts/bench_drain.sh [sizes as SNIPPETS/CHATS ...]  (default: 100000/10000
# 300000/30000 1000000/100000); CYCLES=5 churn rounds of 100000/10000.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
SIZES=("${@:-100000/10000 300000/30000 1000000/100000}")
read -r -a SIZES <<< "${SIZES[*]}"
CYCLES=${CYCLES:-5}

scripts/setup.sh
scripts/install.sh --release >/dev/null
DIR=/var/tmp/memory_ext_bench_drain
PORT=${MEMORY_EXT_BENCH_PORT:-5492}
if cluster_running "$DIR/data" 2>/dev/null; then cluster_ctl "$DIR/data" stop; fi
rm -rf "$DIR"; mkdir -p "$DIR"; chown postgres:postgres "$DIR"
cluster_init "$DIR/data" "$PORT" "max_connections = 20" "shared_buffers = '512MB'" \
    "memory_ext.database = 'drain'" "memory_ext.rate_limit_per_minute = 0"
cluster_ctl "$DIR/data" start
trap 'cluster_ctl "$DIR/data" stop || true' EXIT
psql_d() { psql -h "$DIR/data" -p "$PORT" -U postgres -X -q -v ON_ERROR_STOP=1 -At "$@"; }

serve() { # on|off: the worker serves database drain, or nothing
    local db=drain; [[ $1 == off ]] && db=nobody
    psql_d -d postgres -c "ALTER SYSTEM SET memory_ext.database = '$db'" -c "SELECT pg_reload_conf()" >/dev/null
    if [[ $1 == off ]]; then
        until [[ $(psql_d -d postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'memory_ext worker'") == 0 ]]; do sleep 0.1; done
    fi
}

fresh_extension() {
    serve off
    psql_d -d postgres -c "DROP DATABASE IF EXISTS drain" -c "CREATE DATABASE drain" >/dev/null
    psql_d -d drain -c "CREATE EXTENSION memory_ext" >/dev/null
}

autovacuum() { # on|off for the queue and chat tables
    local v=true; [[ $1 == off ]] && v=false
    psql_d -d drain -c "ALTER TABLE memory.chat_context_queue SET (autovacuum_enabled = $v)" \
        -c "ALTER TABLE memory.chat_metadata SET (autovacuum_enabled = $v)" >/dev/null
}

burst() { # snippets chats: the rows enqueue() would leave, written in bulk, the worker paused
    psql_d -d drain -c "INSERT INTO memory.chat_metadata (chat_id, owner, due_at)
        SELECT 'c' || g, 'role:postgres', now() FROM generate_series(0, $2 - 1) g
        ON CONFLICT (chat_id) DO UPDATE SET due_at = coalesce(memory.chat_metadata.due_at, now())" \
        -c "INSERT INTO memory.chat_context_queue (chat_id, new_context_snippet, enqueued_by)
        SELECT 'c' || (g % $2), 'confirmed: k' || (g % 7) || ' = ' || g || E'\nturn ' || g,
               'role:postgres' FROM generate_series(0, $1 - 1) g ORDER BY g" >/dev/null
}

pending() { psql_d -d drain -c "SELECT count(*) FROM memory.chat_context_queue WHERE status IN ('pending_summarization', 'processing')"; }
# Is anything pending? Through the partial (chat_id, seq) index, stopping at the first row: polling
# must not scan the queue (a parallel scan of a million rows every few hundred ms slows the drain
# it times).
busy() { psql_d -d drain -c "SELECT EXISTS (SELECT 1 FROM memory.chat_context_queue WHERE status IN ('pending_summarization', 'processing'))"; }

drain_rate() { # start the worker; from when it runs until nothing is pending -> snippets/s
    local t0 t1 n0
    serve on
    until [[ $(psql_d -d postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'memory_ext worker'") == 1 ]]; do sleep 0.05; done
    t0=$(date +%s.%N)
    n0=$(pending)
    while [[ $(busy) == t ]]; do
        sleep 0.5
    done
    t1=$(date +%s.%N)
    [[ $(pending) == 0 ]] || { echo "bench_drain: chats idle but snippets pending" >&2; exit 1; }
    awk -v a="$t0" -v b="$t1" -v n="$n0" 'BEGIN { printf "%d", n / (b - a) }'
}

declare -A rate
for size in "${SIZES[@]}"; do
    m=${size%/*} ch=${size#*/}
    fresh_extension; autovacuum off; burst "$m" "$ch"; autovacuum on
    rate[fresh_$size]=$(drain_rate)
    echo "bench_drain: $size fresh ${rate[fresh_$size]}/s"
    fresh_extension; burst "$m" "$ch"; psql_d -d drain -c "VACUUM ANALYZE" >/dev/null
    rate[analyzed_$size]=$(drain_rate)
    echo "bench_drain: $size analyzed ${rate[analyzed_$size]}/s"
done

# Churn: rounds of burst, drain and retention (every applied row deleted), then one more burst.
fresh_extension
for _ in $(seq "$CYCLES"); do
    burst 100000 10000; drain_rate >/dev/null
    serve off
    until [[ $(psql_d -d drain -c "SELECT memory._cleanup(0, 50000)") == 0 ]]; do :; done
done
burst 100000 10000
churned=$(drain_rate)
echo "bench_drain: 100000/10000 after $CYCLES churn rounds ${churned}/s"

echo
echo "| snippets / chats | fresh tables, snippets/s | analyzed, snippets/s | fresh / analyzed |"
echo "|---|---|---|---|"
for size in "${SIZES[@]}"; do
    f=${rate[fresh_$size]} a=${rate[analyzed_$size]}
    echo "| $size | $f | $a | $(awk -v f="$f" -v a="$a" 'BEGIN { printf "%.2f", f / a }') |"
done
first=${SIZES[0]} last=${SIZES[-1]}
echo
echo "per-snippet time, $last vs $first (analyzed): $(awk -v f="${rate[analyzed_$first]}" -v l="${rate[analyzed_$last]}" 'BEGIN { printf "%.2fx", f / l }') (flat: <= 1.3x)"
echo "after $CYCLES churn rounds (100000/10000): $churned snippets/s, $(awk -v c="$churned" -v f="${rate[analyzed_100000/10000]:-$churned}" 'BEGIN { printf "%.2fx", f / c }') the per-snippet time of a fresh analyzed run"
