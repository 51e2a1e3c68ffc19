#!/usr/bin/env bash
# Benchmark memory_ext on a scratch cluster (release build, mock summarizer) and print, in one run:
#   1. enqueue throughput vs a plain INSERT into an equal table (pgbench; ratio), and vs a minimal
#      durable insert (uuid primary key + an index on chat_id, the same snippet) at 1, 4, 8 clients
#   2. get() vs a plain primary-key SELECT of chat_metadata, and context() vs get() (pgbench; ratios)
#      and an INSERT into a watched message table vs the same table unwatched (pgbench; ratio)
#   3. enqueue -> memory-visible latency p50/p99 on an idle server
#   4. drain rate for 100k snippets over 10k chats, with one backend and with helpers (4 in all)
#   5. LLM summarizer throughput at llm_concurrency 1, 4, 16 against a fake LLM (200 ms answers)
#   6. LLM calls and prompt tokens per snippet with memory_ext.debounce 0 vs 10 s (the fake LLM)
#   7. with MEMORY_EXT_BENCH_SCALE=1 (long: about 15 minutes more): the drain rate fresh vs
#      analyzed at 100k/300k/1M snippets and after churn (scripts/bench_drain.sh)
#   8. with MEMORY_EXT_BENCH_INSTRUCTIONS=1 (a few minutes more): instructions per transaction of
#      the rows of 1 and 2, counted by callgrind, the same on every run
#      (scripts/bench_instructions.sh)
# Usage: [MEMORY_EXT_BENCH_SCALE=1] [MEMORY_EXT_BENCH_INSTRUCTIONS=1] scripts/bench.sh [seconds per
#        pgbench run, default 15]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
DURATION=${1:-15}
CLIENTS=${BENCH_CLIENTS:-4}

scripts/setup.sh
echo "bench: building and installing memory_ext (release)"
scripts/install.sh --release >/dev/null

DIR=/var/tmp/memory_ext_bench
PORT=${MEMORY_EXT_BENCH_PORT:-5489}
if cluster_running "$DIR/data" 2>/dev/null; then cluster_ctl "$DIR/data" stop; fi
rm -rf "$DIR"; mkdir -p "$DIR"; chown postgres:postgres "$DIR"
cluster_init "$DIR/data" "$PORT" "max_connections = 50" "shared_buffers = '512MB'" \
    "memory_ext.database = 'postgres'"   # bench_api is not served: see below
cluster_ctl "$DIR/data" start
trap 'cluster_ctl "$DIR/data" stop || true' EXIT

psql_b() { psql -h "$DIR/data" -p "$PORT" -U postgres -X -q -v ON_ERROR_STOP=1 -At "$@"; }
pgbench_tps() { # db script-file -> tps
    as_postgres pgbench -h "$DIR/data" -p "$PORT" -U postgres -n -c "$CLIENTS" -j "$(( CLIENTS < 2 ? 1 : 2 ))" \
        -T "$DURATION" -f "$2" "$1" 2>/dev/null \
        | awk '/^tps/ {print int($3)}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# Enqueue is measured in a database the worker does not serve, so the worker's draining does
# not compete for the two cores; the plain table has the same columns, defaults, indexes and FK.
psql_b -d postgres -c "CREATE DATABASE bench_api"
psql_b -d bench_api -f - < scripts/bench/setup.sql
W=$(mktemp -d); chmod 755 "$W"
cp scripts/bench/*.sql "$W"/; chmod 644 "$W"/*.sql   # pgbench reads them as postgres

echo "bench: pgbench, $CLIENTS clients, ${DURATION}s per run, median of three interleaved runs"
# Interleaved runs, median of three: a checkpoint or autovacuum landing in one run must not
# decide the ratio.
median3() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
runs() { # db scriptA scriptB -> "medianA medianB"
    local a=() b=()
    psql_b -d "$1" -c "CHECKPOINT" >/dev/null
    for _ in 1 2 3; do a+=("$(pgbench_tps "$1" "$2")"); b+=("$(pgbench_tps "$1" "$3")"); done
    echo "$(median3 "${a[@]}") $(median3 "${b[@]}")"
}
read -r insert_tps enqueue_tps < <(runs bench_api "$W/insert.sql" "$W/enqueue.sql")
declare -A minimal_at enqueue_at
for n in 1 4 8; do
    read -r "minimal_at[$n]" "enqueue_at[$n]" < <(CLIENTS=$n runs bench_api "$W/minimal.sql" "$W/enqueue.sql")
done
read -r plain_msg_tps watched_msg_tps < <(runs bench_api "$W/messages_plain.sql" "$W/messages_watched.sql")
# give get() real memory to read: apply what was enqueued
# (the enqueue runs' chats and the watched table's conversations: until nothing is left)
for _ in 1 2 3 4; do
    psql_b -d bench_api -c "SET memory_ext.batch_chats = 1000; SET memory_ext.batch_snippets = 10000; SELECT memory.process_pending(5000)" >/dev/null
done
pending=$(psql_b -d bench_api -c "SELECT count(*) FROM memory.chat_context_queue WHERE status <> 'complete'")
[[ $pending == 0 ]] || { echo "bench: $pending snippets left unapplied before the get() runs" >&2; exit 1; }
# steady state, as autovacuum keeps it: not 50k dead index entries from the bulk apply above
psql_b -d bench_api -c "VACUUM ANALYZE" >/dev/null
read -r select_tps get_tps < <(runs bench_api "$W/select.sql" "$W/get.sql")
read -r get2_tps context_tps < <(runs bench_api "$W/get.sql" "$W/context.sql")

# Claim cost as the queue grows: one _claim of the same work (200 chats, one snippet each; rolled
# back) at 10k and at 1M pending rows. An index-driven claim stays near 1x; a scan would grow ~100x.
psql_b -d bench_api <<'SQL'
TRUNCATE memory.chat_metadata CASCADE;
INSERT INTO memory.chat_metadata (chat_id, owner) SELECT 'c' || g, 'postgres' FROM generate_series(0, 9999) g;
INSERT INTO memory.chat_context_queue (chat_id, new_context_snippet, enqueued_by)
SELECT 'c' || (g % 10000), 'snippet ' || g, 'postgres' FROM generate_series(1, 10000) g;
VACUUM ANALYZE memory.chat_metadata, memory.chat_context_queue;
CREATE FUNCTION public.claim_ms() RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
  PERFORM count(*) FROM memory._claim(200, 1, 300);
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;
SQL
claim_ms() { # median of 5 rolled-back claims
    for _ in 1 2 3 4 5; do psql_b -d bench_api -c "BEGIN" -c "SELECT public.claim_ms()" -c "ROLLBACK" | sed -n 1p; done | sort -n | sed -n 3p
}
claim_small=$(claim_ms)
psql_b -d bench_api -c "INSERT INTO memory.chat_context_queue (chat_id, new_context_snippet, enqueued_by) SELECT 'c' || (g % 10000), 'snippet ' || g, 'postgres' FROM generate_series(10001, 1000000) g" -c "VACUUM ANALYZE memory.chat_context_queue" >/dev/null
claim_large=$(claim_ms)

# Latency on an idle server: enqueue, commit, then memory.wait() until the worker applied it.
psql_b -d postgres <<'SQL'
CREATE EXTENSION memory_ext;
CREATE TABLE public.latency (ms float8);
CREATE PROCEDURE public.measure(n int) LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; q uuid; s text;
BEGIN
  FOR i IN 1..n LOOP
    t0 := clock_timestamp();
    SELECT queue_id INTO q FROM memory.enqueue('lat' || (i % 10), 'confirmed: step = ' || i || E'\nstep ' || i);
    COMMIT;
    s := memory.wait(q, '10 seconds');
    IF s <> 'complete' THEN RAISE EXCEPTION 'snippet % ended %', q, s; END IF;
    INSERT INTO public.latency VALUES (extract(epoch FROM clock_timestamp() - t0) * 1000);
    COMMIT;
  END LOOP;
END $$;
CALL public.measure(20);
TRUNCATE public.latency;
CALL public.measure(300);
SQL
read -r p50 p99 < <(psql_b -d postgres -F ' ' -c "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2), round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2) FROM public.latency")

# Drain: 100k snippets over 10k chats, committed at once into fresh tables; time until none is
# left pending. With one backend (the worker), then with memory_ext.workers_per_database = 4
# (the worker and up to three helpers).
drain_run() { # workers -> "rate seconds enqueue_seconds failed"
    psql_b -d postgres -c "ALTER SYSTEM SET memory_ext.workers_per_database = $1" -c "SELECT pg_reload_conf()" >/dev/null
    psql_b -d postgres -c "TRUNCATE memory.chat_metadata, memory.chat_context_queue, memory.chat_memory_history, memory.owner_turns" 2>/dev/null
    psql_b -d postgres -c "SELECT count(*) FROM (SELECT memory.create_chat('drain' || g) FROM generate_series(0, 9999) g) x" >/dev/null
    psql_b -d postgres -c "CHECKPOINT" >/dev/null
    local start enqueued done_at
    start=$(date +%s.%N)
    psql_b -d postgres -c "SELECT count(*) FROM (SELECT memory.enqueue('drain' || (g % 10000), 'confirmed: n = ' || g || E'\nline ' || g) FROM generate_series(0, 99999) g) x" >/dev/null
    enqueued=$(date +%s.%N)
    # Polled through the partial (chat_id, seq) index, stopping at the first open row: no scan.
    while [[ $(psql_b -d postgres -c "SELECT EXISTS (SELECT 1 FROM memory.chat_context_queue WHERE status IN ('pending_summarization', 'processing'))") == t ]]; do
        sleep 0.1
    done
    done_at=$(date +%s.%N)
    awk -v s="$start" -v a="$enqueued" -v b="$done_at" \
        -v f="$(psql_b -d postgres -c "SELECT count(*) FROM memory.chat_context_queue WHERE status = 'failed'")" \
        'BEGIN { printf "%d %.2f %.2f %d\n", 100000 / (b - a), b - a, a - s, f }'
}
read -r drain_rate drain_s enqueue_s failed < <(drain_run 1)
read -r drain4_rate drain4_s _ failed4 < <(drain_run 4)
failed=$((failed + failed4))
psql_b -d postgres -c "ALTER SYSTEM RESET memory_ext.workers_per_database" -c "SELECT pg_reload_conf()" >/dev/null

# LLM concurrency: the openai summarizer against the fake LLM server answering after a fixed
# 200 ms. 1,000 chats with one pending snippet each; chats applied per second over a window
# that starts once the worker is in steady state, at llm_concurrency 1, 4 and 16.
cargo build --quiet --release --manifest-path tests/cluster/Cargo.toml --bin fake_llm
tests/cluster/target/release/fake_llm 0 200 "$W/requests.jsonl" > "$W/fake_llm.out" &
FAKE_PID=$!
until LLM_PORT=$(sed -n 's/^fake LLM listening on 127.0.0.1://p' "$W/fake_llm.out") && [[ -n $LLM_PORT ]]; do sleep 0.1; done
trap 'kill $FAKE_PID 2>/dev/null || true; cluster_ctl "$DIR/data" stop || true' EXIT
psql_b -d postgres -c "ALTER SYSTEM SET memory_ext.summarizer = 'openai'" \
    -c "ALTER SYSTEM SET memory_ext.llm_endpoint = 'http://127.0.0.1:$LLM_PORT/v1'" \
    -c "ALTER SYSTEM SET memory_ext.llm_model = 'fake'" >/dev/null
done_count() { psql_b -d postgres -c "SELECT count(*) FROM memory.chat_context_queue WHERE status = 'complete'"; }
declare -A llm_rate
for conc in 1 4 16; do
    psql_b -d postgres -c "TRUNCATE memory.chat_metadata CASCADE" \
        -c "ALTER SYSTEM SET memory_ext.llm_concurrency = $conc" -c "SELECT pg_reload_conf()" >/dev/null
    sleep 1 # the reload reaches the worker asynchronously
    psql_b -d postgres -c "SELECT count(*) FROM (SELECT memory.enqueue('llm' || g, 'confirmed: n = ' || g || E'\nline ' || g) FROM generate_series(0, 999) g) x" >/dev/null
    sleep 1
    a=$(done_count); t0=$(date +%s.%N)
    sleep 8
    b=$(done_count); t1=$(date +%s.%N)
    llm_rate[$conc]=$(awk -v a="$a" -v b="$b" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.1f", (b - a) / (t1 - t0) }')
    llm_failed=$(psql_b -d postgres -c "SELECT count(*) FROM memory.chat_context_queue WHERE status = 'failed'")
    [[ $llm_failed == 0 ]] || { echo "bench: $llm_failed snippets failed at concurrency $conc" >&2; exit 1; }
done

# Debounce: 20 chats, each a burst of 5 turns 2 s apart (100 turns), through the openai summarizer
# and the fake LLM, with memory_ext.debounce 0 and 10 s: LLM calls per snippet and prompt tokens
# per snippet, counted with cl100k (memory.count_tokens) on the messages of the request bodies the
# fake received.
debounce_run() { # debounce -> "calls/snippet prompt-tokens/snippet"
    psql_b -d postgres -c "TRUNCATE memory.chat_metadata CASCADE" \
        -c "ALTER SYSTEM SET memory_ext.debounce = '$1'" -c "SELECT pg_reload_conf()" >/dev/null
    sleep 1
    : > "$W/requests.jsonl"
    for turn in 0 1 2 3 4; do
        psql_b -d postgres -c "SELECT count(*) FROM (SELECT memory.enqueue('talk' || c, 'user: turn $turn of chat ' || c || ', about plans, premiums and deductibles for next year.') FROM generate_series(0, 19) c) x" >/dev/null
        sleep 2
    done
    while [[ $(psql_b -d postgres -c "SELECT count(*) FROM memory.chat_metadata WHERE due_at IS NOT NULL OR lease_token IS NOT NULL") != 0 ]]; do
        sleep 0.5
    done
    sleep 0.2 # the fake writes its log every 50 ms
    local calls tokens=0 body
    calls=$(wc -l < "$W/requests.jsonl")
    while IFS= read -r body; do
        tokens=$((tokens + $(psql_b -d postgres -v body="$body" <<'SQL'
SELECT memory.count_tokens(string_agg(m ->> 'content', E'\n')) FROM jsonb_array_elements(:'body'::jsonb -> 'messages') m
SQL
)))
    done < "$W/requests.jsonl"
    awk -v c="$calls" -v t="$tokens" 'BEGIN { printf "%.2f %.0f\n", c / 100, t / 100 }'
}
read -r calls0 tokens0 < <(debounce_run 0)
read -r calls10 tokens10 < <(debounce_run 10s)
psql_b -d postgres -c "ALTER SYSTEM RESET memory_ext.debounce" >/dev/null
psql_b -d postgres -c "ALTER SYSTEM RESET memory_ext.summarizer" -c "ALTER SYSTEM RESET memory_ext.llm_endpoint" \
    -c "ALTER SYSTEM RESET memory_ext.llm_model" -c "ALTER SYSTEM RESET memory_ext.llm_concurrency" \
    -c "SELECT pg_reload_conf()" >/dev/null

cat <<REPORT

memory_ext benchmark — $(date -u +%Y-%m-%d), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), PostgreSQL $(psql_b -d postgres -c "SHOW server_version"), release build
| measure | memory_ext | baseline | ratio | target |
|---|---|---|---|---|
| enqueue, tx/s ($CLIENTS clients) | $enqueue_tps | plain INSERT: $insert_tps | $(ratio "$enqueue_tps" "$insert_tps") | >= 0.80 |
| enqueue, tx/s, 1 client | ${enqueue_at[1]} | minimal insert: ${minimal_at[1]} | $(ratio "${enqueue_at[1]}" "${minimal_at[1]}") | >= 0.50 |
| enqueue, tx/s, 4 clients | ${enqueue_at[4]} | minimal insert: ${minimal_at[4]} | $(ratio "${enqueue_at[4]}" "${minimal_at[4]}") | >= 0.50 |
| enqueue, tx/s, 8 clients | ${enqueue_at[8]} | minimal insert: ${minimal_at[8]} | $(ratio "${enqueue_at[8]}" "${minimal_at[8]}") | >= 0.50 |
| get(), tx/s ($CLIENTS clients) | $get_tps | plain PK SELECT: $select_tps | $(ratio "$get_tps" "$select_tps") | >= 0.80 |
| context() (prompt text, exact token count), tx/s ($CLIENTS clients) | $context_tps | get(), same runs: $get2_tps | $(ratio "$context_tps" "$get2_tps") | >= 0.90 |
| INSERT into a watched message table (captured), tx/s ($CLIENTS clients) | $watched_msg_tps | same table unwatched: $plain_msg_tps | $(ratio "$watched_msg_tps" "$plain_msg_tps") | >= 0.70 |
| enqueue -> memory visible, p50 / p99 ms (idle, 300 runs) | $p50 / $p99 | | | <= 20 / <= 100 |
| one claim (200 chats × 1 snippet), ms: 1M pending rows vs 10k | $claim_large | 10k pending: $claim_small | $(ratio "$claim_large" "$claim_small") | ~1 (O(log n)) |
| drain 100k snippets / 10k chats | $drain_rate snippets/s (${drain_s}s; $failed failed) | enqueue of the batch: ${enqueue_s}s | $(ratio "$drain_rate" 5000) of target | >= 5000/s |
| drain 100k snippets / 10k chats, workers_per_database 4 | $drain4_rate snippets/s (${drain4_s}s) | 1 worker: $drain_rate | $(ratio "$drain4_rate" "$drain_rate") | >= 3 with 8 on a many-core machine |
| LLM summarizer (fake, 200 ms/answer), chats/s: concurrency 4 | ${llm_rate[4]} | concurrency 1: ${llm_rate[1]} | $(ratio "${llm_rate[4]}" "${llm_rate[1]}") | ~4 |
| LLM summarizer (fake, 200 ms/answer), chats/s: concurrency 16 | ${llm_rate[16]} | concurrency 1: ${llm_rate[1]} | $(ratio "${llm_rate[16]}" "${llm_rate[1]}") | >= 12 |
| debounce 10 s: LLM calls per snippet (20 chats × 5 turns 2 s apart) | $calls10 | debounce 0: $calls0 | $(ratio "$calls10" "$calls0") | |
| debounce 10 s: prompt tokens per snippet (cl100k, request bodies) | $tokens10 | debounce 0: $tokens0 | $(ratio "$tokens10" "$tokens0") | |
REPORT

if [[ ${MEMORY_EXT_BENCH_SCALE:-0} == 1 || ${MEMORY_EXT_BENCH_INSTRUCTIONS:-0} == 1 ]]; then
    # their own clusters: this one and the fake LLM go first, so the two cores are theirs
    kill $FAKE_PID 2>/dev/null || true
    cluster_ctl "$DIR/data" stop
    trap - EXIT
fi
if [[ ${MEMORY_EXT_BENCH_INSTRUCTIONS:-0} == 1 ]]; then
    echo
    scripts/bench_instructions.sh | sed -n '/^memory_ext instructions/,$p'
fi
if [[ ${MEMORY_EXT_BENCH_SCALE:-0} == 1 ]]; then
    echo
    echo "drain across sizes and table histories (scripts/bench_drain.sh):"
    scripts/bench_drain.sh | grep -E '^\||^per-snippet |^after '
fi
