# Helpers to run a scratch PostgreSQL 15 cluster as the `postgres` OS user (initdb refuses root).
# Sourced by demo.sh and bench.sh.
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PG_BIN=/usr/lib/postgresql/15/bin
DEMO_DIR=${MEMORY_EXT_DEMO_DIR:-/var/tmp/memory_ext_demo}
DEMO_PORT=${MEMORY_EXT_DEMO_PORT:-5488}

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
        echo "memory_ext.database = 'postgres'"
        printf '%s\n' "$@"
    } >> "$data/postgresql.conf"
}

cluster_running() { as_postgres "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

cluster_ctl() { as_postgres "$PG_BIN/pg_ctl" -D "$1" -l "$1/server.log" -w "$2" >/dev/null; }
