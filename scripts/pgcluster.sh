#!/usr/bin/env bash
# A local PostgreSQL 15 cluster with fraiseql_obs preloaded.
#   pgcluster.sh start DIR PORT [extra postgresql.conf lines...]
#   pgcluster.sh stop DIR
# The cluster runs as the `postgres` OS user when called as root (PostgreSQL
# refuses root); its socket is in DIR, so: psql -h DIR -p PORT -U postgres
set -euo pipefail
BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
cmd=$1; dir=$(realpath -m "$2")

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    port=$3; shift 3
    if [ ! -f "$dir/PG_VERSION" ]; then
        mkdir -p "$dir"
        if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
        as_owner "$BIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
        {
            echo "port = $port"
            echo "listen_addresses = '127.0.0.1'"
            echo "unix_socket_directories = '$dir'"
            echo "shared_preload_libraries = 'fraiseql_obs'"
            echo "max_worker_processes = 16"
            echo "logging_collector = off"
            for line in "$@"; do echo "$line"; done
        } >> "$dir/postgresql.conf"
        if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/postgresql.conf"; fi
    fi
    if as_owner "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        echo "pgcluster: already running in $dir"
    else
        # no Rust backtraces in error details, as in production
        as_owner env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
        echo "pgcluster: started in $dir (port $port)"
    fi
    ;;
stop)
    if [ -f "$dir/PG_VERSION" ] && as_owner "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        as_owner "$BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
        echo "pgcluster: stopped $dir"
    fi
    ;;
*)
    echo "usage: $0 start DIR PORT [conf lines...] | stop DIR" >&2; exit 2;;
esac
