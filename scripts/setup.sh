#!/usr/bin/env bash
# Install what building and testing memory_ext needs, skipping whatever is already there:
# Debian's PostgreSQL 15 (+ server headers, pgTAP and pg_prove), clang for bindgen, sudo (pgrx runs initdb
# through it), cargo-pgrx 0.18.1, and `cargo pgrx init` against the system PostgreSQL.
set -euo pipefail

PGRX_VERSION=0.18.1
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo

packages=(postgresql-15 postgresql-server-dev-15 postgresql-15-pgtap libtap-parser-sourcehandler-pgtap-perl
          libclang-dev clang sudo)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q " ${PGRX_VERSION}\$"; then
    echo "setup: installing cargo-pgrx ${PGRX_VERSION} (about 7 minutes)"
    cargo install cargo-pgrx --version "=${PGRX_VERSION}" --locked --quiet
fi

if ! grep -qs "^pg15 *= *\"${PG_CONFIG}\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15="${PG_CONFIG}" >/dev/null
fi
