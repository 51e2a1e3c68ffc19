#!/usr/bin/env bash
# The pgTAP suite (tests/pgtap/*.sql) with pg_prove, against a scratch cluster set up like
# Supabase: roles anon, authenticated, service_role and a login role authenticator that PostgREST
# would connect as. Needs memory_ext installed (scripts/install.sh). Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
DIR=/var/tmp/memory_ext_pgtap
PORT=${MEMORY_EXT_PGTAP_PORT:-5490}
if cluster_running "$DIR/data" 2>/dev/null; then cluster_ctl "$DIR/data" stop; fi
rm -rf "$DIR"; mkdir -p "$DIR"; chown postgres:postgres "$DIR"
cluster_init "$DIR/data" "$PORT"
cluster_ctl "$DIR/data" start
trap 'cluster_ctl "$DIR/data" stop || true' EXIT
psql -h "$DIR/data" -p "$PORT" -U postgres -d postgres -X -q -v ON_ERROR_STOP=1 <<'SQL'
CREATE ROLE anon NOLOGIN;
CREATE ROLE authenticated NOLOGIN;
CREATE ROLE service_role NOLOGIN;
CREATE ROLE authenticator LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO authenticator;
CREATE EXTENSION pgtap;
CREATE EXTENSION memory_ext;
SQL
pg_prove -h "$DIR/data" -p "$PORT" -U postgres -d postgres tests/pgtap/[0-9]*.sql
