#!/usr/bin/env bash
# Throwaway PostgreSQL and Redis servers on loopback, for the tests and for local runs.
#
# Usage: scripts/services.sh COMMAND [ARG]
#   install          apt-get install postgresql, redis-server, wrk, prometheus and chromium, only where missing
#                    (as root, or with sudo that needs no password; otherwise says what to run)
#   start            start both servers (idempotent: a running server is left as it is)
#   stop             stop both servers (idempotent)
#   status           say whether each server runs; exit 0 only when both do
#   env              print the export lines for DATABASE_URL and REDIS_URL
#   start-postgres | stop-postgres | start-redis | stop-redis
#                    start or stop one server alone (fault tests stop one while the system runs)
#   createdb NAME    create database NAME on the PostgreSQL server if it does not exist yet
#
# Environment:
#   DRIFTLOOP_SERVICES_DIR  state folder (data, logs, pid files); default .driftloop/services
#   DRIFTLOOP_PG_PORT       PostgreSQL port on 127.0.0.1; default 55432
#   DRIFTLOOP_REDIS_PORT    Redis port on 127.0.0.1; default 56379
#   DRIFTLOOP_PG_BINDIR     folder holding initdb and pg_ctl; found under /usr/lib/postgresql otherwise
#
# PostgreSQL trusts every connection from loopback and has the superuser `driftloop`; both servers
# keep nothing worth keeping (no fsync, no Redis persistence). Exit status 3 means the binaries are
# missing (run `scripts/services.sh install`).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${DRIFTLOOP_SERVICES_DIR:-$REPO_ROOT/.driftloop/services}
PG_PORT=${DRIFTLOOP_PG_PORT:-55432}
REDIS_PORT=${DRIFTLOOP_REDIS_PORT:-56379}
PG_USER=driftloop
PG_DB=driftloop
HOST=127.0.0.1
EXIT_MISSING=3

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "error: $1"; exit "${2:-1}"; }

# ---------------------------------------------------------------------------------------- binaries

pg_bindir() {
    # Prints the folder with initdb and pg_ctl, or nothing.
    local dir
    if [[ -n ${DRIFTLOOP_PG_BINDIR:-} ]]; then
        echo "$DRIFTLOOP_PG_BINDIR"
        return
    fi
    if dir=$(command -v initdb 2>/dev/null) && dir=$(dirname "$(readlink -f "$dir")") \
        && [[ -x $dir/pg_ctl ]]; then
        echo "$dir"
        return
    fi
    # Debian keeps the server binaries out of PATH; take the newest major version.
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
        if [[ -x $dir/initdb && -x $dir/pg_ctl && -x $dir/postgres ]]; then
            echo "$dir"
            return
        fi
    done
}

have_postgres() { local d; d=$(pg_bindir); [[ -n $d && -x $d/initdb && -x $d/pg_ctl ]]; }
have_redis() { command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; }

need_postgres() {
    have_postgres || die "PostgreSQL server binaries (initdb, pg_ctl) not found: run 'scripts/services.sh install'" "$EXIT_MISSING"
}
need_redis() {
    have_redis || die "redis-server/redis-cli not found: run 'scripts/services.sh install'" "$EXIT_MISSING"
}

cmd_install() {
    local packages=()
    have_postgres || packages+=(postgresql)
    have_redis || packages+=(redis-server)
    command -v wrk >/dev/null 2>&1 || packages+=(wrk)  # the serving benchmark's load generator
    # promtool checks and unit-tests the alert rules; the server runs them against the stack.
    command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
    # The drift review page's test renders it headless (no JavaScript errors, a screenshot).
    command -v chromium >/dev/null 2>&1 || packages+=(chromium)
    if ((${#packages[@]} == 0)); then
        log "postgresql, redis-server, wrk, prometheus and chromium already installed"
        return
    fi
    local sudo=()
    if ((EUID != 0)); then
        # Not root: sudo without a password prompt (no stdin here), or say what to run instead.
        if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
            sudo=(sudo -n)
        else
            die "installing ${packages[*]} needs root, and sudo is missing or asks for a password: run
    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${packages[*]}
or, as root, 'bash scripts/services.sh install' (what 'make services-install' runs)"
        fi
    fi
    log "installing ${packages[*]} from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q)
    "${apt[@]}" update
    "${apt[@]}" install -y --no-install-recommends "${packages[@]}" </dev/null
    have_postgres || die "PostgreSQL binaries still missing after installing ${packages[*]}"
    have_redis || die "redis-server still missing after installing ${packages[*]}"
}

# -------------------------------------------------------------------------------------- PostgreSQL

# PostgreSQL refuses to run as root: as root, its files belong to the `postgres` OS user and every
# server command runs as that user.
as_pg() {
    if ((EUID == 0)); then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

ensure_pg_os_user() {
    ((EUID == 0)) || return 0
    id -u postgres >/dev/null 2>&1 && return 0
    log "creating the OS user 'postgres' to run the server"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
}

pg_home() {
    # The server's folder: $STATE/postgres, or where that symlink points (see make_pg_home).
    if [[ -L $STATE/postgres ]]; then readlink -f "$STATE/postgres"; else echo "$STATE/postgres"; fi
}

make_pg_home() {
    # A symlink left to a /tmp folder that is gone since (a reboot): start over.
    [[ -L $STATE/postgres && ! -e $STATE/postgres ]] && rm -f "$STATE/postgres"
    [[ -e $STATE/postgres ]] && return 0
    mkdir -p "$STATE/postgres"
    ((EUID == 0)) || return 0
    chown postgres: "$STATE/postgres"
    chmod 700 "$STATE/postgres"
    if ! as_pg test -w "$STATE/postgres"; then
        # The postgres user cannot reach the state folder (a checkout under /root, say): keep the
        # cluster under /tmp, and leave a symlink where it would have been.
        local key other
        key=$(printf '%s' "$STATE" | md5sum | cut -c1-12)
        other=/tmp/driftloop-postgres-$key
        rmdir "$STATE/postgres"
        mkdir -p "$other"
        chown postgres: "$other"
        chmod 700 "$other"
        ln -s "$other" "$STATE/postgres"
        log "the postgres user cannot reach $STATE; PostgreSQL data is in $other"
    fi
}

pg_ctl_() { as_pg "$(pg_bindir)/pg_ctl" -D "$(pg_home)/data" "$@"; }

pg_running() { [[ -f $(pg_home)/data/PG_VERSION ]] && pg_ctl_ status >/dev/null 2>&1; }

# Runs a command that leaves a server behind with no file descriptor but 0-2: the server must not
# hold the lock of with_lock, nor a pipe of whoever called this script (a CI runner waiting for EOF).
detached() {
    (
        local fd
        for fd in /proc/"$BASHPID"/fd/*; do
            fd=${fd##*/}
            ((fd > 2)) && eval "exec $fd>&-"
        done
        "$@"
    )
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

psql_() {
    "$(pg_bindir)/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PG_PORT" -U "$PG_USER" "$@"
}

pg_init() {
    local data
    data=$(pg_home)/data
    [[ -f $data/PG_VERSION ]] && return 0
    log "initialising a PostgreSQL cluster in $data"
    as_pg "$(pg_bindir)/initdb" -D "$data" -U "$PG_USER" --auth=trust -E UTF8 --locale=C \
        --no-sync --no-instructions >"$(pg_home)/initdb.log" 2>&1 \
        || { cat "$(pg_home)/initdb.log" >&2; die "initdb failed (log: $(pg_home)/initdb.log)"; }
    # A throwaway cluster: durability is traded for speed. TCP on loopback only, no Unix socket
    # (its default folder may not exist, and nothing here needs it).
    as_pg tee -a "$data/postgresql.conf" >/dev/null <<'EOF'

# --- driftloop test server (scripts/services.sh) ---
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
}

pg_start() {
    need_postgres
    if pg_running; then
        log "PostgreSQL already running on $HOST:$PG_PORT"
        return 0
    fi
    port_open "$PG_PORT" && die "port $HOST:$PG_PORT is taken by another process: set DRIFTLOOP_PG_PORT to a free port"
    ensure_pg_os_user
    make_pg_home
    pg_init
    log "starting PostgreSQL on $HOST:$PG_PORT"
    if ! detached pg_ctl_ -l "$(pg_home)/postgres.log" -w -t 60 -o "-p $PG_PORT" start >/dev/null; then
        tail -n 20 "$(pg_home)/postgres.log" >&2 || true
        die "PostgreSQL did not start (log: $(pg_home)/postgres.log)"
    fi
    pg_createdb "$PG_DB"
}

pg_stop() {
    have_postgres || return 0
    if pg_running; then
        log "stopping PostgreSQL"
        pg_ctl_ -m fast -w -t 60 stop >/dev/null
    fi
}

pg_createdb() {
    local name=$1
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]{0,62}$ ]] || die "not a plain database name: '$name'"
    pg_running || die "PostgreSQL is not running: run 'scripts/services.sh start' first"
    local exists
    exists=$(psql_ -d postgres -tA -c "SELECT 1 FROM pg_database WHERE datname = '$name'")
    if [[ $exists != 1 ]]; then
        psql_ -d postgres -c "CREATE DATABASE \"$name\"" \
            || [[ $(psql_ -d postgres -tA -c "SELECT 1 FROM pg_database WHERE datname = '$name'") == 1 ]]
    fi
}

# ------------------------------------------------------------------------------------------- Redis

redis_pidfile() { echo "$STATE/redis/redis.pid"; }

redis_running() {
    local pid
    [[ -f $(redis_pidfile) ]] || return 1
    pid=$(cat "$(redis_pidfile)" 2>/dev/null) || return 1
    # The pid must still be a redis-server: after a reboot it may belong to anything.
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null \
        && [[ $(cat "/proc/$pid/comm" 2>/dev/null || echo redis-server) == redis-server* ]]
}

redis_ping() { [[ $(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

redis_start() {
    need_redis
    if redis_running; then
        log "Redis already running on $HOST:$REDIS_PORT"
        return 0
    fi
    port_open "$REDIS_PORT" && die "port $HOST:$REDIS_PORT is taken by another process: set DRIFTLOOP_REDIS_PORT to a free port"
    mkdir -p "$STATE/redis"
    rm -f "$(redis_pidfile)"
    log "starting Redis on $HOST:$REDIS_PORT"
    detached redis-server --bind "$HOST" --port "$REDIS_PORT" --save '' --appendonly no \
        --daemonize yes --pidfile "$(redis_pidfile)" --logfile "$STATE/redis/redis.log" \
        --dir "$STATE/redis" </dev/null >/dev/null 2>&1 \
        || die "redis-server refused to start (log: $STATE/redis/redis.log)"
    local i
    for ((i = 0; i < 100; i++)); do
        redis_ping && return 0
        sleep 0.1
    done
    tail -n 20 "$STATE/redis/redis.log" >&2 || true
    die "Redis did not answer on $HOST:$REDIS_PORT (log: $STATE/redis/redis.log)"
}

redis_stop() {
    redis_running || { rm -f "$(redis_pidfile)"; return 0; }
    local pid i
    pid=$(cat "$(redis_pidfile)")
    log "stopping Redis"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$(redis_pidfile)"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$(redis_pidfile)"
}

# ----------------------------------------------------------------------------------------- commands

cmd_status() {
    local rc=0
    if have_postgres && pg_running; then
        echo "postgresql: running on $HOST:$PG_PORT ($(pg_home)/data)"
    else
        echo "postgresql: stopped"
        rc=1
    fi
    if redis_running; then
        echo "redis: running on $HOST:$REDIS_PORT (pid $(cat "$(redis_pidfile)"))"
    else
        echo "redis: stopped"
        rc=1
    fi
    return "$rc"
}

cmd_env() {
    echo "export DATABASE_URL=postgresql://$PG_USER@$HOST:$PG_PORT/$PG_DB"
    echo "export REDIS_URL=redis://$HOST:$REDIS_PORT/0"
}

# Serialise state changes, so two test sessions starting at once do not both run initdb.
with_lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 120 9 || die "another services.sh holds $STATE/.lock"
    "$@"
}

main() {
    local cmd=${1:-}
    case $cmd in
        install) cmd_install ;;
        start) need_postgres; need_redis; with_lock pg_start; with_lock redis_start ;;
        stop) with_lock redis_stop; with_lock pg_stop ;;
        status) cmd_status ;;
        env) cmd_env ;;
        start-postgres) with_lock pg_start ;;
        stop-postgres) with_lock pg_stop ;;
        start-redis) with_lock redis_start ;;
        stop-redis) with_lock redis_stop ;;
        createdb)
            [[ -n ${2:-} ]] || die "usage: scripts/services.sh createdb NAME"
            need_postgres
            pg_createdb "$2"
            ;;
        -h | --help | help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
        *) sed -n '4,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
}

main "$@"
