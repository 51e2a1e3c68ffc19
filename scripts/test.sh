#!/usr/bin/env bash
# Run every test suite against every supported PostgreSQL major (MEMORY_EXT_TEST_PG, default
# "15 18"): formatting and lints, unit + in-database pg_tests (cargo pgrx test), the isolation
# specs, the worker tests against real clusters, the release tests (update from 0.1.0, dump and
# restore), the stress test (tests/cluster) and the pgTAP security suite; then pg_upgrade from
# the first major to the last, and the packages (which leave PostgreSQL 15 without memory_ext:
# scripts/install.sh puts it back).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
majors=(${MEMORY_EXT_TEST_PG:-15 18})
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo fmt --check / clippy"
cargo fmt --check
for pg in "${majors[@]}"; do
    cargo clippy --quiet --all-targets --no-default-features --features "pg$pg" -- -D warnings
done
(cd tests/cluster && cargo fmt --check && cargo clippy --quiet --tests -- -D warnings)

for pg in "${majors[@]}"; do
    export MEMORY_EXT_PG=$pg
    source scripts/cluster.sh   # PG_BIN and MEMORY_EXT_PG_BIN for this major

    echo "== PostgreSQL $pg: unit tests and pg_tests (cargo pgrx test)"
    pgdata=/var/tmp/memory_ext_pgrx_test$pg
    rm -rf "$pgdata"; mkdir -p "$pgdata"; chown postgres:postgres "$pgdata"
    cargo pgrx test "pg$pg" --runas postgres --pgdata "$pgdata" 2>&1 | tee -a "$log"

    echo "== PostgreSQL $pg: isolation specs: the lease protocol under interleavings (pg_isolation_regress)"
    scripts/install.sh
    scripts/isolation.sh 2>&1 | tee -a "$log"
    scripts/install_check.sh 2>&1 | tee -a "$log"

    echo "== PostgreSQL $pg: worker, LLM summarizer and many-database tests against real clusters and a fake LLM (tests/cluster)"
    cargo test --manifest-path tests/cluster/Cargo.toml --test worker --test llm --test databases --test watch -- --test-threads=2 2>&1 | tee -a "$log"

    echo "== PostgreSQL $pg: releases: ALTER EXTENSION UPDATE from 0.1.0 (rows kept, catalog equal to a fresh install), pg_dump/pg_restore"
    cargo test --manifest-path tests/cluster/Cargo.toml --test releases -- --skip pg_upgrade 2>&1 | tee -a "$log"

    echo "== PostgreSQL $pg: stress: seeded random schedules checked against a reference model (MEMORY_EXT_STRESS_SECS, _SEED)"
    cargo test --manifest-path tests/cluster/Cargo.toml --test stress -- --nocapture 2>&1 | tee -a "$log"

    echo "== PostgreSQL $pg: pgTAP: grants, ownership, RLS, search_path, secrets, rate limit, audit (pg_prove)"
    pgtap_out=$(mktemp)
    scripts/pgtap.sh 2>&1 | tee "$pgtap_out"
    # pg_prove's summary in the same shape as cargo's, for the closing line
    awk '/^Files=[0-9]+, Tests=/ { sub(/^Files=[0-9]+, Tests=/, ""); sub(/,.*/, ""); t = $0 }
         /^Result: PASS/ { printf "test result: ok. %d passed; 0 failed (pgTAP)\n", t }' "$pgtap_out" >> "$log"
    rm -f "$pgtap_out"
done

if (( ${#majors[@]} > 1 )); then
    first=${majors[0]}; last=${majors[-1]}
    echo "== pg_upgrade from PostgreSQL $first to $last with memory_ext data; the worker resumes"
    MEMORY_EXT_OLD_PG_BIN=$(MEMORY_EXT_PG=$first; source scripts/cluster.sh; echo "$PG_BIN") \
        cargo test --manifest-path tests/cluster/Cargo.toml --test releases pg_upgrade 2>&1 | tee -a "$log"
fi

echo "== packages: the .deb (dpkg -i, the demo's flow, dpkg -r) and the PostgreSQL 18 tarball, on fresh clusters"
scripts/package_check.sh 2>&1 | tee -a "$log"

# One closing line for all suites.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$log"
