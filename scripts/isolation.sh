#!/usr/bin/env bash
# The isolation specs (tests/isolation/specs/*.spec) with PostgreSQL's isolation tester, against a
# scratch cluster WITHOUT the background worker (each interleaving is exactly what the spec says).
# Needs memory_ext installed (scripts/install.sh). Called by scripts/test.sh. To re-bless an
# expected file after a deliberate change: compare, then copy from $DIR/out/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
DIR=/var/tmp/memory_ext_isolation
PORT=${MEMORY_EXT_ISOLATION_PORT:-5491}
ISO=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/isolation
if cluster_running "$DIR/data" 2>/dev/null; then cluster_ctl "$DIR/data" stop; fi
rm -rf "$DIR"; mkdir -p "$DIR/out"; chown -R postgres:postgres "$DIR"
cluster_init "$DIR/data" "$PORT" "shared_preload_libraries = ''"
cluster_ctl "$DIR/data" start
trap 'cluster_ctl "$DIR/data" stop || true' EXIT
as_postgres "$PG_BIN/createdb" -h "$DIR/data" -p "$PORT" memory_ext_isolation
cp -r tests/isolation/specs tests/isolation/expected tests/isolation/schedule "$DIR/out/"
chown -R postgres:postgres "$DIR/out"
status=0
as_postgres "$ISO/pg_isolation_regress" --use-existing --host="$DIR/data" --port="$PORT" \
    --user=postgres --dbname=memory_ext_isolation --bindir="$PG_BIN" \
    --inputdir="$DIR/out" --outputdir="$DIR/out" --schedule="$DIR/out/schedule" \
    | tee "$DIR/out/summary" || status=$?
[[ -f "$DIR/out/regression.diffs" ]] && cat "$DIR/out/regression.diffs"
# One line in cargo's shape for test.sh's closing count.
awk '/ \.\.\. ok|^ok [0-9]/ { p++ } / \.\.\. FAILED|^not ok / { f++ }
     END { printf "test result: %s. %d passed; %d failed (isolation)\n", (f || !p ? "FAILED" : "ok"), p, f + !p }' \
    "$DIR/out/summary"
exit "$status"
