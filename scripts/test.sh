#!/usr/bin/env bash
# Run every test suite: formatting and lints, unit + in-database pg_tests (cargo pgrx test), the
# isolation specs, the worker tests against real clusters and the stress test (tests/cluster), and
# the pgTAP security suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo fmt --check / clippy"
cargo fmt --check
cargo clippy --quiet --features pg15 -- -D warnings
(cd tests/cluster && cargo fmt --check && cargo clippy --quiet --tests -- -D warnings)

echo "== unit tests and pg_tests (cargo pgrx test)"
pgdata=/var/tmp/memory_ext_pgrx_test
rm -rf "$pgdata"; mkdir -p "$pgdata"; chown postgres:postgres "$pgdata"
cargo pgrx test pg15 --runas postgres --pgdata "$pgdata" 2>&1 | tee -a "$log"

echo "== isolation specs: the lease protocol under interleavings (pg_isolation_regress)"
cargo pgrx install --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
scripts/isolation.sh 2>&1 | tee -a "$log"

echo "== worker and LLM summarizer tests against real clusters and a fake LLM (tests/cluster)"
cargo test --manifest-path tests/cluster/Cargo.toml --test worker --test llm -- --test-threads=2 2>&1 | tee -a "$log"

echo "== stress: seeded random schedules checked against a reference model (MEMORY_EXT_STRESS_SECS, _SEED)"
cargo test --manifest-path tests/cluster/Cargo.toml --test stress -- --nocapture 2>&1 | tee -a "$log"

echo "== pgTAP: grants, ownership, RLS, search_path, secrets, rate limit, audit (pg_prove)"
pgtap_out=$(mktemp)
scripts/pgtap.sh 2>&1 | tee "$pgtap_out"
# pg_prove's summary in the same shape as cargo's, for the closing line
awk '/^Files=[0-9]+, Tests=/ { sub(/^Files=[0-9]+, Tests=/, ""); sub(/,.*/, ""); t = $0 }
     /^Result: PASS/ { printf "test result: ok. %d passed; 0 failed (pgTAP)\n", t }' "$pgtap_out" >> "$log"
rm -f "$pgtap_out"

# One closing line for all suites.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$log"
