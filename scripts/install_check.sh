#!/usr/bin/env bash
# Installing over a running server must not disturb it: scripts/install.sh writes a new file
# and renames it over the library, so the server keeps the one it mapped. Starts a cluster with
# the worker, reinstalls while it runs, restarts its worker (which the postmaster forks with the
# library it loaded), and checks the cluster still serves: no crash, the snippet applied.
# Called by scripts/test.sh after scripts/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
DIR=/var/tmp/memory_ext_install_check$MEMORY_EXT_PG
PORT=${MEMORY_EXT_INSTALL_CHECK_PORT:-$((5430 + MEMORY_EXT_PG))}
if cluster_running "$DIR/data" 2>/dev/null; then cluster_ctl "$DIR/data" stop; fi
rm -rf "$DIR"; mkdir -p "$DIR"; chown postgres:postgres "$DIR"
cluster_init "$DIR/data" "$PORT"
cluster_ctl "$DIR/data" start
trap 'cluster_ctl "$DIR/data" stop || true' EXIT
q() { psql -h "$DIR/data" -p "$PORT" -U postgres -d postgres -X -A -t -q -v ON_ERROR_STOP=1 "$@"; }
q -c "CREATE EXTENSION memory_ext"
lib="$("$PG_CONFIG" --pkglibdir)/memory_ext.so"
before=$(stat -c %i "$lib")
scripts/install.sh >/dev/null
after=$(stat -c %i "$lib")
q -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'memory_ext worker'" >/dev/null
id=$(q -c "SELECT queue_id FROM memory.enqueue('install-check', 'confirmed: still = serving')")
status=$(q -c "SELECT memory.wait('$id', '30 seconds')")
crashes=$(grep -c "terminated by signal" "$DIR/data/server.log" || true)
if [[ $before != "$after" && $status == complete && $crashes == 0 ]]; then
    echo "test result: ok. 1 passed; 0 failed (install over a running server)"
else
    echo "install over a running server: inode $before -> $after, snippet $status, $crashes crash(es)" >&2
    tail -20 "$DIR/data/server.log" >&2
    echo "test result: FAILED. 0 passed; 1 failed (install over a running server)"
    exit 1
fi
