#!/usr/bin/env bash
# HTTP load against the real agentbus binary, from a clean checkout: a throwaway Synapse and
# agentbus (echo provider) in a temp dir on free loopback ports, then
#   1. transactions: EVENTS events in transactions of BATCH over ROOMS rooms no agent is in,
#      one in flight at a time, as Synapse sends them (acknowledged and drained events/s,
#      ack latency);
#   2. echo latency: for each count in CONVERSATIONS, that many people each DM @damon and
#      send MESSAGES messages one after another (send → reply latency, messages/s);
#   3. team tasks: for each count n in TASKS, a star team (@devteam: coordinator @damon,
#      workers coder, researcher, writer, tester) gets max(n, MIN_TASKS) tasks, n at once,
#      one group room per slot (send → "✅ done" status latency, tasks/s, events per task,
#      and the CPU seconds Synapse and agentbus spent on the timed part).
# Everything it started is stopped on exit. Results: BENCHMARKS.md, "HTTP load against the
# running binary" and "A star team task over HTTP".
#
#   scripts/load.sh
#   EVENTS=20000 CONVERSATIONS="1 10" MESSAGES=20 scripts/load.sh
#   EVENTS=0 CONVERSATIONS=0 TASKS="1 100" scripts/load.sh      # team tasks only
#
# Environment: EVENTS (200000), BATCH (100), ROOMS (1000), CONVERSATIONS ("1 10"),
# MESSAGES (20), TASKS ("1 100"), MIN_TASKS (20); EVENTS=0, CONVERSATIONS=0 or TASKS=0
# skips that part (the agents writer and tester and the team are configured only when
# TASKS runs). KEEP=1 keeps the temp dir (logs, store) after a successful run too,
# RUST_LOG for agentbus (its default when unset).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
EVENTS="${EVENTS:-200000}"
BATCH="${BATCH:-100}"
ROOMS="${ROOMS:-1000}"
CONVERSATIONS="${CONVERSATIONS:-1 10}"
MESSAGES="${MESSAGES:-20}"
TASKS="${TASKS:-1 100}"
MIN_TASKS="${MIN_TASKS:-20}"
SERVER_NAME=localhost
HS="$ROOT/scripts/dev-homeserver.sh"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/release"
BIN="$TARGET/agentbus"
LOAD="$TARGET/examples/appservice_load"

# shellcheck source=lib.sh
. "$ROOT/scripts/lib.sh"

# Prints the exact command, then runs it.
run() { printf '+' >&2; printf ' %q' "$@" >&2; printf '\n' >&2; "$@"; }
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
secret() { python3 -c 'import secrets; print(secrets.token_hex(24))'; }
# Other work on the machine shows in every number here; the load average says how much.
loadavg() { printf 'load average %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"; }
team_part() {
    local n
    for n in $TASKS; do ((n > 0)) && return 0; done
    return 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/agentbus-load.XXXXXX")"
AGENTBUS_PID=""
OK=0
# shellcheck disable=SC2317 # called from traps
cleanup() {
    if [[ -n "$AGENTBUS_PID" ]] && kill -0 "$AGENTBUS_PID" 2>/dev/null; then
        # SIGTERM is agentbus' graceful shutdown; how long it takes is worth knowing too.
        local t0=$SECONDS
        if terminate "$AGENTBUS_PID" 30 pid_alive "$AGENTBUS_PID"; then
            log "agentbus stopped $((SECONDS - t0)) s after SIGTERM"
        else
            log "agentbus did not stop within 30 s of SIGTERM; sending SIGKILL"
            kill -KILL "$AGENTBUS_PID" 2>/dev/null || true
        fi
        wait "$AGENTBUS_PID" 2>/dev/null || true
    fi
    "$HS" stop --dir "$WORK/synapse" >/dev/null 2>&1 || true
    if ((OK)) && [[ "${KEEP:-}" != 1 ]]; then
        rm -rf "$WORK"
    else
        log "logs and store kept in $WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "installing Synapse (first run only)"
run "$HS" install

step "building the release binary and the load driver (the first build takes several minutes)"
(cd "$ROOT" && run cargo build --release --locked --bin agentbus --example appservice_load)

HS_PORT="$(free_port)"
AS_PORT="$(free_port)"
while [[ "$AS_PORT" == "$HS_PORT" ]]; do AS_PORT="$(free_port)"; done
HS_URL="http://127.0.0.1:$HS_PORT"
AS_URL="http://127.0.0.1:$AS_PORT"
HS_TOKEN="$(secret)"
CONFIG="$WORK/agentbus.yaml"
# Part 3's team and its two other workers; left out when it does not run, so that parts 1
# and 2 run with the agents they always had.
TEAM_AGENTS="" TEAMS=""
if team_part; then
    TEAM_AGENTS='
  - { id: writer, display_name: Writer, provider: echo }
  - { id: tester, display_name: Tester, provider: echo }'
    TEAMS='
teams:
  - { id: devteam, display_name: Dev Team, mode: star, coordinator: damon,
      workers: [coder, researcher, writer, tester], limits: { max_fanout: 4 } }'
fi
cat >"$CONFIG" <<YAML
# Written by scripts/load.sh for one load run.
homeserver: { url: "$HS_URL", server_name: $SERVER_NAME }
appservice: { id: agentbus-load, bind: "127.0.0.1:$AS_PORT", as_token: "$(secret)", hs_token: "$HS_TOKEN" }
store: { path: data }
providers:
  echo: { api: echo }
agents:
  - { id: damon, display_name: Damon, aliases: ["戴蒙"], provider: echo }
  - { id: coder, display_name: Coder, provider: echo }
  - { id: researcher, display_name: Researcher, provider: echo }$TEAM_AGENTS
channels:
  # Group rooms: open (agents and the team join on an invite from an allow_from sender).
  matrix: { dm_policy: allowlist, allow_from: ["@*:$SERVER_NAME"], group_policy: open }
# A load run measures throughput: the per-sender and per-room answer limits are lifted.
routing:
  limits: { per_sender: { answers: 1000000, per: 1s }, per_room: { answers: 1000000, per: 1s } }$TEAMS
YAML

step "writing the registration (rate_limited: false) and starting Synapse on $HS_URL"
run "$BIN" --config "$CONFIG" registration --output "$WORK/registration.yaml"
grep -q '^rate_limited: false' "$WORK/registration.yaml" \
    || die "$WORK/registration.yaml does not say rate_limited: false"
run "$HS" start --dir "$WORK/synapse" --port "$HS_PORT" --server-name "$SERVER_NAME" \
    --registration "$WORK/registration.yaml"

step "starting agentbus on $AS_URL (log: $WORK/agentbus.log)"
printf '+ %q --config %q serve 2>%q &\n' "$BIN" "$CONFIG" "$WORK/agentbus.log" >&2
"$BIN" --config "$CONFIG" serve 2>"$WORK/agentbus.log" >/dev/null &
AGENTBUS_PID=$!
started=0
wait_for_line "$AGENTBUS_PID" "$WORK/agentbus.log" "agentbus is running" 120 || started=$?
case "$started" in
    1)
        tail -n 20 "$WORK/agentbus.log" >&2
        die "agentbus exited during startup (log above)"
        ;;
    2) die "agentbus did not start within 120 s" ;;
esac

STATUS=0
: >"$WORK/transactions.txt"
if ((EVENTS > 0)); then
    step "transactions: $EVENTS events, batch $BATCH, $ROOMS rooms ($(loadavg))"
    run "$LOAD" --url "$AS_URL" --hs-token "$HS_TOKEN" --events "$EVENTS" --batch "$BATCH" \
        --rooms "$ROOMS" --server-name "$SERVER_NAME" | tee "$WORK/transactions.txt" \
        || STATUS=1
    loadavg >>"$WORK/transactions.txt"
fi

for n in $CONVERSATIONS; do
    ((n > 0)) || continue
    step "echo latency: $n conversation(s) × $MESSAGES messages with @damon ($(loadavg))"
    run "$LOAD" --mode echo --conversations "$n" --messages "$MESSAGES" --homeserver "$HS_URL" \
        --server-name "$SERVER_NAME" --shared-secret-file "$WORK/synapse/shared_secret" \
        | tee "$WORK/echo-$n.txt" || STATUS=1
    loadavg >>"$WORK/echo-$n.txt"
done

SYNAPSE_PID="$(cat "$WORK/synapse/synapse.pid" 2>/dev/null || echo 0)"
for n in $TASKS; do
    ((n > 0)) || continue
    count=$((n > MIN_TASKS ? n : MIN_TASKS))
    step "team tasks: $count star task(s) for @devteam, $n at once ($(loadavg))"
    run "$LOAD" --mode team --tasks "$count" --concurrency "$n" --team devteam \
        --team-agents damon,coder,researcher,writer,tester --homeserver "$HS_URL" \
        --server-name "$SERVER_NAME" --shared-secret-file "$WORK/synapse/shared_secret" \
        --cpu-pid "synapse=$SYNAPSE_PID" --cpu-pid "agentbus=$AGENTBUS_PID" \
        | tee "$WORK/team-$n.txt" || STATUS=1
    loadavg >>"$WORK/team-$n.txt"
done

COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "unknown (not a git checkout)")"
if [[ -n "$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]]; then
    COMMIT="$COMMIT + uncommitted changes in src/"
fi
step "summary (commit $COMMIT, $(nproc) cores)"
{
    ((EVENTS > 0)) && printf 'transactions (%s events, batch %s, %s rooms):\n' "$EVENTS" "$BATCH" "$ROOMS"
    grep -E '^(acknowledged events/s|ack latency|non-200|drain|load average)' "$WORK/transactions.txt" | sed 's/^/  /'
    for n in $CONVERSATIONS; do
        ((n > 0)) || continue
        printf 'echo, %s conversation(s) × %s messages:\n' "$n" "$MESSAGES"
        grep -E '^(replies|messages/s|send → reply|load average)' "$WORK/echo-$n.txt" | sed 's/^/  /'
    done
    for n in $TASKS; do
        ((n > 0)) || continue
        printf 'team tasks, %s at once:\n' "$n"
        grep -E '^(tasks|send →|events per task|CPU time|failed task|load average)' \
            "$WORK/team-$n.txt" | sed 's/^/  /'
    done
} || true
if ((STATUS)); then
    printf '\nload.sh: some measurement failed or was incomplete (see above)\n' >&2
fi
OK=$((!STATUS))
exit "$STATUS"
