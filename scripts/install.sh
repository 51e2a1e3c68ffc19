#!/usr/bin/env bash
# Build memory_ext and install it into one PostgreSQL (MEMORY_EXT_PG=15, the default, or 18)
# without ever rewriting a file a running server has mapped: every file is staged first
# (cargo pgrx package), then copied beside its destination and renamed over it, as dpkg does.
# A running server keeps the library it loaded until it restarts. Installs the install scripts
# of released versions too (sql/released/), so `CREATE EXTENSION memory_ext VERSION '0.1.0'` and
# `ALTER EXTENSION memory_ext UPDATE` work.
#
#   scripts/install.sh [--release] [--stage-only]
#
# The staged tree is left in target/stage/pg<major> (scripts/package.sh packs it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh

profile=(--debug)
stage_only=""
for arg in "$@"; do
    case "$arg" in
        --release) profile=() ;;
        --stage-only) stage_only=1 ;;
        *) echo "usage: scripts/install.sh [--release] [--stage-only]" >&2; exit 2 ;;
    esac
done
features=()
[[ $MEMORY_EXT_PG != 15 ]] && features=(--no-default-features --features "pg$MEMORY_EXT_PG")

stage=target/stage/pg$MEMORY_EXT_PG
rm -rf "$stage"
log=$(mktemp)
if ! cargo pgrx package "${profile[@]}" --pg-config "$PG_CONFIG" --out-dir "$stage" "${features[@]}" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
cp sql/released/memory_ext--*.sql "$stage$("$PG_CONFIG" --sharedir)/extension/"
[[ -n $stage_only ]] && exit 0

(cd "$stage" && find . -type f) | while read -r f; do
    dest=/${f#./}
    mkdir -p "$(dirname "$dest")"
    cp "$stage/$f" "$dest.new.$$"
    mv -f "$dest.new.$$" "$dest"
done
echo "install: memory_ext $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml) into PostgreSQL $MEMORY_EXT_PG ($("$PG_CONFIG" --pkglibdir))"
