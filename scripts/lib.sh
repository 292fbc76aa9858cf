# shellcheck shell=bash
# Shared by the scripts in this directory: messages, the install lock, starting a server
# detached, waiting for it (pid file, URL, log line) and stopping it. Sourced, not run:
#
#   . "$(dirname "$0")/lib.sh"
#
# Every function returns a status instead of exiting, so each script keeps its own exit
# codes and messages.

PROG="$(basename "$0")"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }
# A step of a long run, set off by a blank line.
step() { printf '\n==> %s\n' "$*" >&2; }

valid_port() {
    [[ "$1" =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535))
}

# ------------------------------------------------------------------ locking --

# take_lock FILE SECONDS WAITING: an exclusive lock on FILE, held on file descriptor 8
# until release_lock (or exit); logs WAITING if another process holds it, and returns 1
# if that process keeps it for SECONDS.
take_lock() {
    local file="$1" seconds="$2" waiting="$3"
    exec 8>"$file"
    flock -n 8 && return 0
    log "$waiting"
    flock -w "$seconds" 8
}

release_lock() { exec 8>&-; }

# ---------------------------------------------------------------- processes --

# detached PID_FILE COMMAND...: execs COMMAND in a session of its own, so a Ctrl-C aimed
# at the caller does not reach it (and killing -PID reaches all it starts); PID_FILE gets
# its PID. Run it in the background with the redirections wanted. The inner shell
# records its own PID before exec because setsid may fork, which would make $! the wrong
# process.
detached() {
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
    exec setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$@"
}

# wait_for_file FILE: up to 5 s for FILE to be non-empty (a pid file being written).
wait_for_file() {
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s "$1" ]] && return 0
        sleep 0.1
    done
    return 1
}

# live_pid PID_FILE TEXT...: prints the PID in PID_FILE if that process is alive and is
# ours: not a zombie (which passes kill -0; in containers nobody may reap it) and, where
# /proc shows its command line, that line contains every TEXT (a guard against PID
# reuse). Prints nothing otherwise.
live_pid() {
    local file="$1" pid state cmdline text
    shift
    [[ -s "$file" ]] || return 0
    pid="$(<"$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    [[ -r "/proc/$pid/stat" ]] || { kill -0 "$pid" 2>/dev/null && echo "$pid"; return 0; }
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z ]] || return 0
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    for text in "$@"; do
        [[ "$cmdline" == *"$text"* ]] || return 0
    done
    echo "$pid"
}

pid_alive() { kill -0 "$1" 2>/dev/null; }

# terminate TARGET SECONDS RUNNING...: SIGTERM to TARGET (a PID, or -PID for its process
# group), then up to SECONDS while `RUNNING...` succeeds. Returns 1 if it still runs.
terminate() {
    local target="$1" seconds="$2" i
    shift 2
    kill -TERM -- "$target" 2>/dev/null || true
    for ((i = 0; i < seconds * 10; i++)); do
        "$@" || return 0
        sleep 0.1
    done
    ! "$@"
}

# stop_process PID SECONDS WHAT RUNNING...: terminate PID; if it ignores SIGTERM for
# SECONDS, says so and sends SIGKILL, then waits up to 5 s more.
stop_process() {
    local pid="$1" seconds="$2" what="$3"
    shift 3
    terminate "$pid" "$seconds" "$@" && return 0
    log "$what (pid $pid) ignored SIGTERM for ${seconds}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do
        "$@" || return 0
        sleep 0.1
    done
}

# ------------------------------------------------------------------ waiting --

# The HTTP status of a GET of URL (000 or 0 when nothing answers).
http_status() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$1" 2>/dev/null || true
    else
        "${VENV_PY:-python3}" - "$1" <<'PY' 2>/dev/null || true
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=3).status)
except Exception as e:
    print(getattr(e, "code", 0))
PY
    fi
}

# wait_for_url URL SECONDS RUNNING...: polls URL until it answers 200 (returns 0);
# returns 1 as soon as `RUNNING...` fails (the server died), 2 after SECONDS.
wait_for_url() {
    local url="$1" seconds="$2" t0=$SECONDS
    shift 2
    while :; do
        [[ "$(http_status "$url")" == 200 ]] && return 0
        "$@" || return 1
        ((SECONDS - t0 >= seconds)) && return 2
        sleep 0.3
    done
}

# wait_for_line PID FILE TEXT SECONDS: until FILE (PID's log) contains TEXT (returns 0);
# returns 1 as soon as PID has exited, 2 after SECONDS.
wait_for_line() {
    local pid="$1" file="$2" text="$3" seconds="$4" i
    for ((i = 0; i < seconds * 5; i++)); do
        pid_alive "$pid" || return 1
        grep -q -- "$text" "$file" && return 0
        sleep 0.2
    done
    return 2
}
