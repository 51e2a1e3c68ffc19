#!/usr/bin/env bash
# Build and install memory_ext, start a local cluster with the worker (mock summarizer), and show
# it doing its job: create a chat, enqueue two snippets, wait for the worker, print the memory.
# Safe to re-run: it rebuilds only when sources changed and reuses the running cluster.
# MEMORY_EXT_PG=18 runs it on PostgreSQL 18 (its own directory and port).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh

scripts/setup.sh

stamp="$DEMO_DIR/.installed"
mkdir -p "$DEMO_DIR"
if [[ ! -f "$stamp" || -n $(find src sql Cargo.toml Cargo.lock memory_ext.control -newer "$stamp" 2>/dev/null | head -1) \
      || ! -f "$(pg_libdir)/memory_ext.so" ]]; then
    echo "demo: building and installing memory_ext (release, PostgreSQL $MEMORY_EXT_PG)"
    # Staged, then renamed into place: a running demo cluster keeps its loaded library until
    # the restart below.
    if ! scripts/install.sh --release > "$DEMO_DIR/install.log" 2>&1; then
        cat "$DEMO_DIR/install.log" >&2; exit 1
    fi
    touch "$stamp"
    restart=1
fi

cluster_init "$DEMO_DIR/data" "$DEMO_PORT"
if cluster_running "$DEMO_DIR/data" && [[ -n ${restart:-} ]]; then
    cluster_ctl "$DEMO_DIR/data" restart   # a new .so reaches the preloaded worker only on restart
else
    cluster_running "$DEMO_DIR/data" || cluster_ctl "$DEMO_DIR/data" start
fi

psql_demo() { psql -h "$DEMO_DIR/data" -p "$DEMO_PORT" -U postgres -d postgres -X -v ON_ERROR_STOP=1 "$@"; }
if [[ -n ${restart:-} ]]; then
    # A rebuilt extension: re-create its objects so they match the new library (demo data only).
    psql_demo -q -c "SET client_min_messages = warning" -c "DROP EXTENSION IF EXISTS memory_ext CASCADE"
fi
psql_demo -q <<'SQL'
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS memory_ext;
DO $$ BEGIN PERFORM memory.forget('demo') FROM memory.chat_metadata WHERE chat_id = 'demo'; END $$;
SELECT memory.create_chat('demo') \gset
SELECT queue_id AS q1 FROM memory.enqueue('demo', E'confirmed: plan = PPO\nThe user is comparing health plans for next year.') \gset
SELECT queue_id AS q2 FROM memory.enqueue('demo', E'inferred: budget = tight\nThey asked twice about premiums.') \gset
\echo 'Enqueued two snippets; waiting for the background worker...'
SELECT memory.wait(:'q1') AS first, memory.wait(:'q2') AS second;
\x on
SELECT * FROM memory.get('demo');
\x off
SELECT running, pid, database, processed, failed, state FROM memory.worker_status();
SQL
echo "demo: cluster running; connect with: psql -h $DEMO_DIR/data -p $DEMO_PORT -U postgres"
echo "demo: stop it with: runuser -u postgres -- $PG_BIN/pg_ctl -D $DEMO_DIR/data stop"
