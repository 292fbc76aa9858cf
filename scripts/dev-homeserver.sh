#!/usr/bin/env bash
# Local Synapse homeserver for agentbus development and end-to-end tests.
#
#   dev-homeserver.sh install
#   dev-homeserver.sh start    --dir DIR --port PORT --server-name NAME --registration FILE [--foreground]
#   dev-homeserver.sh stop     --dir DIR
#   dev-homeserver.sh register --dir DIR --user LOCALPART --password PW [--admin]
#
# Environment:
#   SYNAPSE_VERSION  Synapse release to use (default 1.163.2).
#   AGENTBUS_CACHE   where venvs live (default ~/.cache/agentbus).
#   PYTHON           interpreter used to create the venv (default python3).
#
# Synapse is pinned because config keys and their validation change between
# releases; the generated homeserver.yaml below was checked against 1.163.2.
set -euo pipefail

SYNAPSE_VERSION="${SYNAPSE_VERSION:-1.163.2}"
CACHE_DIR="${AGENTBUS_CACHE:-$HOME/.cache/agentbus}"
VENV="$CACHE_DIR/synapse-$SYNAPSE_VERSION"
VENV_PY="$VENV/bin/python"
# The marker, not the directory, says "installed": a venv dir can exist
# half-populated after an interrupted pip run.
MARKER="$VENV/.agentbus-install-ok"
READY_TIMEOUT=180
STOP_TIMEOUT=15

# shellcheck source=lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    local code="${1:-2}"
    cat >&2 <<EOF
usage:
  $PROG install
  $PROG start --dir DIR --port PORT --server-name NAME --registration FILE [--foreground]
  $PROG stop --dir DIR
  $PROG register --dir DIR --user LOCALPART --password PW [--admin]

env: SYNAPSE_VERSION (default 1.163.2), AGENTBUS_CACHE (default ~/.cache/agentbus)
EOF
    exit "$code"
}

bad_usage() { log "$*"; usage; }

abspath() {
    # realpath -m is GNU-only; cd/pwd works everywhere for an existing parent.
    local p="$1" d b
    d="$(dirname -- "$p")"; b="$(basename -- "$p")"
    d="$(cd -- "$d" 2>/dev/null && pwd)" || return 1
    printf '%s/%s\n' "$d" "$b"
}

# YAML double-quoted scalars accept JSON string escapes, so json.dumps gives
# correct quoting for any path or secret without hand-rolled escaping.
yq() { "$VENV_PY" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

random_secret() { "$VENV_PY" -c 'import secrets; print(secrets.token_urlsafe(32))'; }

# ---------------------------------------------------------------- install --

cmd_install() {
    [[ -f "$MARKER" ]] && return 0

    mkdir -p "$CACHE_DIR"
    local lock="$CACHE_DIR/synapse-$SYNAPSE_VERSION.lock"
    local pip_log="$CACHE_DIR/synapse-$SYNAPSE_VERSION.pip.log"
    take_lock "$lock" 900 "waiting for another process installing Synapse $SYNAPSE_VERSION..." \
        || die "timed out waiting for install lock $lock"
    # Whoever held the lock may have just finished the install.
    if [[ -f "$MARKER" ]]; then
        release_lock
        return 0
    fi

    log "installing Synapse $SYNAPSE_VERSION into $VENV (first run only, about a minute)"
    local t0=$SECONDS
    # Reuse an existing venv (e.g. one populated by an earlier run without a
    # marker): pip then only verifies requirements, which takes seconds.
    if [[ ! -x "$VENV_PY" ]]; then
        "${PYTHON:-python3}" -m venv "$VENV" >>"$pip_log" 2>&1 \
            || { tail -n 20 "$pip_log" >&2; die "could not create venv at $VENV (see $pip_log)"; }
    fi
    if ! "$VENV_PY" -m pip install --disable-pip-version-check \
            "matrix-synapse==$SYNAPSE_VERSION" >>"$pip_log" 2>&1; then
        tail -n 30 "$pip_log" >&2
        die "pip install matrix-synapse==$SYNAPSE_VERSION failed (see $pip_log)"
    fi
    "$VENV_PY" -c 'import synapse.app.homeserver' >>"$pip_log" 2>&1 \
        || die "Synapse installed but does not import (see $pip_log)"
    echo "$SYNAPSE_VERSION" >"$MARKER"
    log "Synapse $SYNAPSE_VERSION installed in $((SECONDS - t0))s"
    release_lock
}

# ---------------------------------------------------------------- helpers --

# Prints the PID of DIR's Synapse if it is alive, otherwise nothing. Only processes
# serving this config are ours.
running_pid() { live_pid "$1/synapse.pid" "$1/homeserver.yaml"; }

# shellcheck disable=SC2317 # called through wait_for_url and stop_process
synapse_running() { [[ -n "$(running_pid "$1")" ]]; }

# Prints server_name, http port and registration path of a config, one a line.
read_config() {
    "$VENV_PY" - "$1" <<'PY'
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
port = next((l["port"] for l in c.get("listeners", []) if l.get("type") == "http"), "")
regs = c.get("app_service_config_files") or [""]
print(c.get("server_name", ""), port, regs[0], sep="\n")
PY
}

show_log_tail() {
    local dir="$1"
    if [[ -s "$dir/synapse.log" ]]; then
        log "last 30 lines of $dir/synapse.log:"
        tail -n 30 "$dir/synapse.log" >&2
    fi
    # Crashes before logging is configured (bad YAML, import errors) only
    # reach stdout/stderr; later fatal errors land in both, so avoid repeats.
    if [[ -s "$dir/synapse.out" && ! -s "$dir/synapse.log" ]]; then
        log "last 30 lines of $dir/synapse.out:"
        tail -n 30 "$dir/synapse.out" >&2
    fi
}

# ----------------------------------------------------------------- config --

write_log_config() {
    local dir="$1" foreground="$2" handlers="[file]"
    # Regenerated on every start (it holds no state) so the console handler
    # follows the current mode; background runs must not spam synapse.out.
    [[ "$foreground" == 1 ]] && handlers="[file, console]"
    cat >"$dir/log.yaml.tmp" <<EOF
# Generated by scripts/dev-homeserver.sh; rewritten on every start.
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  # Unbuffered (unlike Synapse's default buffer handler) so the log tail shown
  # on startup failure is complete.
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $(yq "$dir/synapse.log")
    encoding: utf8
  console:
    class: logging.StreamHandler
    formatter: precise
loggers:
  synapse.storage.SQL:
    # DEBUG here would log access tokens.
    level: INFO
root:
  level: INFO
  handlers: $handlers
disable_existing_loggers: false
EOF
    mv -f "$dir/log.yaml.tmp" "$dir/log.yaml"
}

write_homeserver_config() {
    local dir="$1" port="$2" name="$3" reg="$4"
    local shared macaroon form
    shared="$(random_secret)"; macaroon="$(random_secret)"; form="$(random_secret)"
    (umask 077; printf '%s\n' "$shared" >"$dir/shared_secret")

    local r='{per_second: 1000, burst_count: 1000}'
    # Written to a temp file and renamed so an interrupted start never leaves
    # a truncated homeserver.yaml that later starts would "reuse".
    (umask 077; cat >"$dir/homeserver.yaml.tmp" <<EOF
# Generated by scripts/dev-homeserver.sh for Synapse $SYNAPSE_VERSION.
# Local development/test homeserver only: secrets are inline and rate limits
# are effectively disabled. Reused as-is on later starts so state survives.
server_name: $(yq "$name")
report_stats: false

listeners:
  # Client API only; without a federation resource no other server can reach us.
  - port: $port
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false

database:
  name: sqlite3
  args:
    database: $(yq "$dir/homeserver.db")

log_config: $(yq "$dir/log.yaml")
media_store_path: $(yq "$dir/media")
signing_key_path: $(yq "$dir/signing.key")

registration_shared_secret: $(yq "$shared")
macaroon_secret_key: $(yq "$macaroon")
form_secret: $(yq "$form")

app_service_config_files:
  - $(yq "$reg")

enable_registration: false

# No outbound federation either: an empty whitelist refuses every remote
# destination, and an empty key-server list stops matrix.org key lookups.
federation_domain_whitelist: []
trusted_key_servers: []
suppress_key_server_warning: true
serve_server_wellknown: false

presence:
  enabled: false

# Tests create users, rooms and messages in bursts; default limits
# (e.g. 0.2 msg/s) would make them flaky.
rc_message: $r
rc_registration: $r
rc_login:
  address: $r
  account: $r
  failed_attempts: $r
rc_joins:
  local: $r
  remote: $r
rc_invites:
  per_room: $r
  per_user: $r
  per_issuer: $r
rc_room_creation: $r
EOF
    )
    mv -f "$dir/homeserver.yaml.tmp" "$dir/homeserver.yaml"
}

# ------------------------------------------------------------------ start --

cmd_start() {
    local dir="" port="" name="" reg="" foreground=0
    while (($#)); do
        case "$1" in
            --dir) (($# >= 2)) || bad_usage "--dir needs a value"; dir="$2"; shift 2 ;;
            --port) (($# >= 2)) || bad_usage "--port needs a value"; port="$2"; shift 2 ;;
            --server-name) (($# >= 2)) || bad_usage "--server-name needs a value"; name="$2"; shift 2 ;;
            --registration) (($# >= 2)) || bad_usage "--registration needs a value"; reg="$2"; shift 2 ;;
            --foreground) foreground=1; shift ;;
            *) bad_usage "start: unknown argument '$1'" ;;
        esac
    done
    [[ -n "$dir" && -n "$port" && -n "$name" && -n "$reg" ]] \
        || bad_usage "start: --dir, --port, --server-name and --registration are required"
    valid_port "$port" || bad_usage "start: invalid port '$port'"
    port=$((10#$port))
    [[ -f "$reg" ]] || die "registration file not found: $reg"

    cmd_install

    mkdir -p "$dir"
    dir="$(cd -- "$dir" && pwd)"
    reg="$(abspath "$reg")"
    local cfg="$dir/homeserver.yaml"

    if [[ -f "$cfg" ]]; then
        # Reusing the config keeps the database, signing key and secrets; but
        # silently serving a different port/name/registration than asked
        # would surface later as baffling test failures.
        local info old_name old_port old_reg
        info="$(read_config "$cfg")" || die "cannot parse existing $cfg"
        { read -r old_name; read -r old_port; read -r old_reg; } <<<"$info"
        [[ "$old_name" == "$name" ]] \
            || die "$cfg has server_name '$old_name', not '$name' (delete $dir to start fresh)"
        [[ "$old_port" == "$port" ]] \
            || die "$cfg listens on port $old_port, not $port (delete $dir to start fresh)"
        [[ "$old_reg" == "$reg" ]] \
            || die "$cfg uses registration $old_reg, not $reg (delete $dir to start fresh)"
    fi

    local pid
    pid="$(running_pid "$dir")"
    if [[ -n "$pid" ]]; then
        ((foreground)) && die "Synapse for $dir is already running in the background (pid $pid)"
        log "Synapse for $dir already running (pid $pid)"
    else
        [[ -f "$cfg" ]] || write_homeserver_config "$dir" "$port" "$name" "$reg"
        write_log_config "$dir" "$foreground"
        mkdir -p "$dir/media"
        # Only creates what is missing, so an existing signing key is kept.
        "$VENV_PY" -m synapse.app.homeserver -c "$cfg" --generate-keys >"$dir/generate-keys.out" 2>&1 \
            || { cat "$dir/generate-keys.out" >&2; die "Synapse rejected $cfg while generating keys"; }

        if ((foreground)); then
            # exec keeps our PID, so the caller's kill/PR_SET_PDEATHSIG hits Synapse.
            echo $$ >"$dir/synapse.pid"
            cd "$dir"
            exec "$VENV_PY" -m synapse.app.homeserver -c "$cfg"
        fi

        rm -f "$dir/synapse.pid"
        : >"$dir/synapse.out"
        # Detached from the caller's process group so a Ctrl-C aimed at the
        # caller does not take the server down; `stop` does that.
        (cd "$dir" && detached "$dir/synapse.pid" "$VENV_PY" -m synapse.app.homeserver -c "$cfg" \
            </dev/null >>"$dir/synapse.out" 2>&1) &
        wait_for_file "$dir/synapse.pid" || true
        pid="$(<"$dir/synapse.pid")" || die "Synapse did not start (no pid file)"
    fi

    local url="http://127.0.0.1:$port" ready=0
    wait_for_url "$url/_matrix/client/versions" "$READY_TIMEOUT" synapse_running "$dir" || ready=$?
    case "$ready" in
        1)
            show_log_tail "$dir"
            die "Synapse (pid $pid) exited before answering on $url"
            ;;
        2)
            show_log_tail "$dir"
            # A half-started server would keep the port and confuse the next
            # attempt, and callers that see a failure rarely run `stop`.
            stop_dir "$dir"
            die "Synapse did not answer $url/_matrix/client/versions within ${READY_TIMEOUT}s"
            ;;
    esac
    echo "Synapse is up at $url"
}

# ------------------------------------------------------------------- stop --

cmd_stop() {
    local dir=""
    while (($#)); do
        case "$1" in
            --dir) (($# >= 2)) || bad_usage "--dir needs a value"; dir="$2"; shift 2 ;;
            *) bad_usage "stop: unknown argument '$1'" ;;
        esac
    done
    [[ -n "$dir" ]] || bad_usage "stop: --dir is required"
    [[ -d "$dir" ]] || return 0
    stop_dir "$(cd -- "$dir" && pwd)"
}

stop_dir() {
    local dir="$1" pid
    pid="$(running_pid "$dir")"
    if [[ -z "$pid" ]]; then
        rm -f "$dir/synapse.pid"
        return 0
    fi
    stop_process "$pid" "$STOP_TIMEOUT" Synapse synapse_running "$dir" || true
    rm -f "$dir/synapse.pid"
    log "stopped Synapse for $dir"
}

# --------------------------------------------------------------- register --

cmd_register() {
    local dir="" user="" pw="" admin=0 pw_set=0
    while (($#)); do
        case "$1" in
            --dir) (($# >= 2)) || bad_usage "--dir needs a value"; dir="$2"; shift 2 ;;
            --user) (($# >= 2)) || bad_usage "--user needs a value"; user="$2"; shift 2 ;;
            --password) (($# >= 2)) || bad_usage "--password needs a value"; pw="$2"; pw_set=1; shift 2 ;;
            --admin) admin=1; shift ;;
            *) bad_usage "register: unknown argument '$1'" ;;
        esac
    done
    [[ -n "$dir" && -n "$user" && "$pw_set" == 1 ]] \
        || bad_usage "register: --dir, --user and --password are required"
    local cfg="$dir/homeserver.yaml"
    [[ -f "$cfg" ]] || die "no $cfg; run '$PROG start' first"

    cmd_install

    local info port
    info="$(read_config "$cfg")" || die "cannot parse $cfg"
    port="$(sed -n 2p <<<"$info")"
    [[ -n "$port" ]] || die "no http listener in $cfg"
    # register_new_matrix_user would guess http://localhost:PORT, which can
    # resolve to ::1 while we bind only 127.0.0.1.
    local url="http://127.0.0.1:$port"
    [[ "$(http_status "$url/_matrix/client/versions")" == 200 ]] \
        || die "Synapse for $dir is not answering at $url; run '$PROG start' first"

    local admin_flag=--no-admin
    ((admin)) && admin_flag=--admin
    # --exists-ok makes re-registering succeed (idempotent); note it leaves an
    # existing account's password and admin flag unchanged.
    "$VENV/bin/register_new_matrix_user" -c "$cfg" -u "$user" -p "$pw" \
        "$admin_flag" --exists-ok "$url" >&2 \
        || die "registering @$user on $url failed"
}

# ------------------------------------------------------------------- main --

main() {
    (($#)) || usage
    local cmd="$1"; shift
    case "$cmd" in
        install) (($# == 0)) || bad_usage "install takes no arguments"; cmd_install ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        register) cmd_register "$@" ;;
        -h|--help|help) usage 0 ;;
        *) bad_usage "unknown command '$cmd'" ;;
    esac
}

# bash reads scripts lazily; parsing everything before running means editing
# or checking out this file while an install is in progress cannot break it.
main "$@"; exit
