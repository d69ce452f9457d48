#!/usr/bin/env bash
# PostgreSQL for spvit-nas study storage (`spvit-nas search --storage postgresql://...`).
#
#   scripts/postgres.sh install
#       Install the Debian/Ubuntu server package if initdb/pg_ctl are missing (idempotent).
#   scripts/postgres.sh start DATA_DIR [PORT] [LISTEN_ADDRESS] [ALLOWED_CIDR]
#       Create (first time) and start a server for the study: database and role `nas`, password
#       generated once into DATA_DIR/password (mode 600) and added to ~/.pgpass, so the printed
#       URL carries no password. Listens on 127.0.0.1 unless LISTEN_ADDRESS is given (e.g. the
#       head node's private IP); then clients from ALLOWED_CIDR (default: LISTEN_ADDRESS/32)
#       may connect with the password (scram-sha-256). Idempotent: a running server is reused.
#       LISTEN_ADDRESS is one IP address (it is also the host of the printed URL). As root,
#       DATA_DIR must be reachable by the `postgres` user (e.g. under /var/lib or /srv).
#   scripts/postgres.sh stop DATA_DIR
#   scripts/postgres.sh status DATA_DIR
#   scripts/postgres.sh url DATA_DIR
#
# PostgreSQL refuses to run as root: as root the cluster is owned by and run as the `postgres`
# user (runuser). Override the binaries folder with SPVIT_PG_BIN.
set -euo pipefail

DB_NAME=nas
DB_ROLE=nas

die() { echo "postgres.sh: $*" >&2; exit 2; }

find_bin() {
    if [[ -n "${SPVIT_PG_BIN:-}" && -x "$SPVIT_PG_BIN/initdb" ]]; then echo "$SPVIT_PG_BIN"; return; fi
    if command -v pg_config >/dev/null 2>&1 && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        pg_config --bindir; return
    fi
    local newest
    newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$newest" && -x "$newest/initdb" ]]; then echo "$newest"; return; fi
    if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
    return 1
}

as_owner() {  # run a server binary as the cluster owner
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cmd_install() {
    if find_bin >/dev/null; then
        echo "PostgreSQL server binaries present: $(find_bin)"
        return
    fi
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: install the PostgreSQL server (initdb, pg_ctl) with your package manager"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql postgresql-client >/dev/null
    # The package may start a default cluster on 127.0.0.1:5432; spvit-nas does not use it.
    find_bin >/dev/null || die "installed postgresql but found no initdb"
    echo "PostgreSQL server binaries installed: $(find_bin)"
}

port_of() { sed -n 's/^port = \([0-9]*\).*/\1/p' "$1/data/spvit.conf" 2>/dev/null || true; }
host_of() { sed -n "s/^listen_addresses = '\\([^']*\\)'.*/\\1/p" "$1/data/spvit.conf" 2>/dev/null || true; }

cmd_url() {
    local dir=$1 host port
    host=$(host_of "$dir"); port=$(port_of "$dir")
    [[ -n "$port" ]] || die "no server set up in $dir; run: $0 start $dir"
    echo "postgresql://$DB_ROLE@$host:$port/$DB_NAME"
}

cmd_status() {
    local bin dir=$1
    bin=$(find_bin) || die "PostgreSQL not installed; run: $0 install"
    as_owner "$bin/pg_ctl" -D "$dir/data" status
}

cmd_start() {
    local dir=${1:?DATA_DIR required} port=${2:-5432} listen=${3:-127.0.0.1} cidr=${4:-}
    local bin
    bin=$(find_bin) || die "PostgreSQL not installed; run: $0 install"
    [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
    [[ -n "$cidr" ]] || cidr="$listen/32"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ ! -f "$dir/password" ]]; then
        (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/password")
    fi
    local password
    password=$(cat "$dir/password")
    if [[ $(id -u) -eq 0 ]]; then chown -R postgres "$dir"; fi
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
        local pwfile="$dir/.initpw"
        (umask 077; echo "$password" > "$pwfile")
        [[ $(id -u) -ne 0 ]] || chown postgres "$pwfile"
        as_owner "$bin/initdb" -D "$dir/data" -U "$DB_ROLE" --pwfile="$pwfile" \
            --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
        rm -f "$pwfile"
        echo "include_if_exists = 'spvit.conf'" >> "$dir/data/postgresql.conf"
    fi
    # our settings (rewritten each start so port/address changes apply)
    cat > "$dir/data/spvit.conf" <<EOF
listen_addresses = '$listen'
port = $port
unix_socket_directories = '$dir/data'
max_connections = 200
EOF
    cat > "$dir/data/pg_hba.conf" <<EOF
local all all peer
host all all 127.0.0.1/32 scram-sha-256
host all all $cidr scram-sha-256
EOF
    [[ $(id -u) -ne 0 ]] || chown postgres "$dir/data/spvit.conf" "$dir/data/pg_hba.conf"
    if as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_owner "$bin/pg_ctl" -D "$dir/data" reload >/dev/null
    else
        as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null \
            || { tail -n 20 "$dir/server.log" >&2; die "server did not start (log: $dir/server.log)"; }
    fi
    # the study database (owned by the superuser role `nas` created by initdb)
    if ! PGPASSWORD=$password psql -h "$listen" -p "$port" -U "$DB_ROLE" -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'" | grep -q 1; then
        PGPASSWORD=$password psql -h "$listen" -p "$port" -U "$DB_ROLE" -d postgres -qc \
            "CREATE DATABASE $DB_NAME" >/dev/null
    fi
    # ~/.pgpass lets drivers on this machine connect with the password-less URL
    local pgpass="$HOME/.pgpass" line="*:$port:$DB_NAME:$DB_ROLE:$password"
    touch "$pgpass"; chmod 600 "$pgpass"
    grep -qxF "$line" "$pgpass" || echo "$line" >> "$pgpass"
    echo "PostgreSQL for spvit-nas is up. Study storage URL (password in $dir/password, ~/.pgpass):"
    echo "  $(cmd_url "$dir")"
}

cmd_stop() {
    local dir=${1:?DATA_DIR required} bin
    bin=$(find_bin) || die "PostgreSQL not installed"
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
        echo "stopped the server in $dir"
    else
        echo "no server running in $dir"
    fi
}

case "${1:-}" in
    install) cmd_install ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "${1:?DATA_DIR required}" ;;
    url) shift; cmd_url "${1:?DATA_DIR required}" ;;
    *) echo "usage: $0 install | start DATA_DIR [PORT] [LISTEN_ADDRESS] [ALLOWED_CIDR] | stop DATA_DIR | status DATA_DIR | url DATA_DIR" >&2; exit 2 ;;
esac
