#!/usr/bin/env bash
# The packages install on a clean cluster with no Rust involved, and the .deb removes cleanly:
# builds them (scripts/package.sh), installs the .deb with dpkg and the PostgreSQL 18 tarball with
# its install.sh, runs the demo's flow on a fresh cluster of each, then `dpkg -r`. Called last by
# scripts/test.sh; afterwards PostgreSQL 15 has no memory_ext until scripts/install.sh (or the
# demo) installs it again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/package.sh 15 18
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)

flow() {   # the demo's flow on a fresh cluster of $MEMORY_EXT_PG; prints the memory
    source scripts/cluster.sh
    local dir=/var/tmp/memory_ext_package_check$MEMORY_EXT_PG port=$((5420 + MEMORY_EXT_PG))
    if cluster_running "$dir/data" 2>/dev/null; then cluster_ctl "$dir/data" stop; fi
    rm -rf "$dir"; mkdir -p "$dir"; chown postgres:postgres "$dir"
    cluster_init "$dir/data" "$port"
    cluster_ctl "$dir/data" start
    psql -h "$dir/data" -p "$port" -U postgres -d postgres -X -A -t -q -v ON_ERROR_STOP=1 <<'SQL' || true
CREATE EXTENSION memory_ext;
SELECT memory.create_chat('demo');
SELECT queue_id AS q1 FROM memory.enqueue('demo', E'confirmed: plan = PPO\nThe user compares plans.') \gset
SELECT queue_id AS q2 FROM memory.enqueue('demo', 'inferred: budget = tight') \gset
SELECT memory.wait(:'q1') = 'complete' AND memory.wait(:'q2') = 'complete';
SELECT user_confirmed::text || ' ' || llm_inferred::text FROM memory.get('demo');
SQL
    cluster_ctl "$dir/data" stop
}

failed=0
pass() { echo "test result: ok. 1 passed; 0 failed (package: $1)"; }
fail() { echo "package check failed: $1" >&2; echo "test result: FAILED. 0 passed; 1 failed (package: $1)"; failed=1; }

deb=target/packages/postgresql-15-memory-ext_${version}_${arch}.deb
quiet() { local out; out=$("$@" 2>&1) || { echo "$out" >&2; return 1; }; }   # dpkg's triggers are chatty
quiet dpkg -i "$deb"
out=$(MEMORY_EXT_PG=15 flow)
[[ $out == *'{"plan": "PPO"} {"budget": "tight"}'* ]] && pass "the .deb on PostgreSQL 15" || fail "the .deb: $out"
quiet dpkg -r postgresql-15-memory-ext
left=$(ls /usr/lib/postgresql/15/lib/memory_ext* /usr/share/postgresql/15/extension/memory_ext* 2>/dev/null || true)
[[ -z $left ]] && pass "dpkg -r removes every file" || fail "dpkg -r left: $left"

tmp=$(mktemp -d)
tar -C "$tmp" -xzf "target/packages/memory_ext-$version-pg18-linux-$arch.tar.gz"
PG_CONFIG=$(MEMORY_EXT_PG=18; source scripts/cluster.sh; echo "$PG_CONFIG") "$tmp"/memory_ext-*/install.sh >/dev/null
rm -rf "$tmp"
out=$(MEMORY_EXT_PG=18 flow)
[[ $out == *'{"plan": "PPO"} {"budget": "tight"}'* ]] && pass "the tarball on PostgreSQL 18" || fail "the tarball: $out"
exit "$failed"
