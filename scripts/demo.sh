#!/usr/bin/env bash
# The main job on one machine: a local Synapse, agentbus, three demo agents (damon, coder,
# researcher), a demo human user and a #project room with the agents in it.
#
#   scripts/demo.sh          start everything (first run builds and installs; later runs are quick)
#   scripts/demo.sh stop     stop what a previous run left in the background
#
# Environment: HS_PORT (default 8008), AS_PORT (default 9000), AGENTBUS_DEMO_DIR (default .dev/demo).
# With OPENAI_BASE_URL (+ OPENAI_API_KEY, OPENAI_MODEL) set, the agents use that
# OpenAI-compatible model; otherwise they use the built-in echo provider.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${AGENTBUS_DEMO_DIR:-$ROOT/.dev/demo}"
HS_PORT="${HS_PORT:-8008}"
AS_PORT="${AS_PORT:-9000}"
HS_URL="http://127.0.0.1:$HS_PORT"
SERVER_NAME=localhost
BIN="$ROOT/target/debug/agentbus"
HS="$ROOT/scripts/dev-homeserver.sh"

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }

stop_all() {
    if [ -f "$STATE/agentbus.pid" ]; then
        kill "$(cat "$STATE/agentbus.pid")" 2>/dev/null || true
        rm -f "$STATE/agentbus.pid"
    fi
    "$HS" stop --dir "$STATE/synapse" >/dev/null 2>&1 || true
}

if [ "${1:-}" = "stop" ]; then
    stop_all
    echo "stopped"
    exit 0
fi
[ $# -eq 0 ] || die "usage: scripts/demo.sh [stop]"

mkdir -p "$STATE"
stop_all # a previous run's leftovers would hold the ports

step "building agentbus (the first build takes several minutes)"
(cd "$ROOT" && cargo build --locked --bin agentbus)

step "installing Synapse (first run only)"
"$HS" install

if [ ! -f "$STATE/agentbus.yaml" ]; then
    if [ -n "${OPENAI_BASE_URL:-}" ]; then
        provider="model"
        model_line="model: ${OPENAI_MODEL:-gpt-4o-mini}"
        providers="  model: { api: openai-completions, base_url: \"$OPENAI_BASE_URL\", api_key_env: OPENAI_API_KEY }"
    else
        provider="echo"
        model_line=""
        providers="  echo: { api: echo }"
    fi
    cat > "$STATE/agentbus.yaml" <<YAML
# Written by scripts/demo.sh; edit freely (delete it to regenerate).
homeserver: { url: "$HS_URL", server_name: $SERVER_NAME }
appservice: { id: agentbus, bind: "127.0.0.1:$AS_PORT" }
store: { path: data }
providers:
$providers
agents:
  - id: damon
    display_name: Damon
    aliases: ["戴蒙"]
    provider: $provider
    $model_line
    system_prompt: You are Damon, the team's coordinator. Answer briefly.
  - id: coder
    display_name: Coder
    provider: $provider
    $model_line
    system_prompt: You are a careful senior programmer.
  - id: researcher
    display_name: Researcher
    provider: $provider
    $model_line
    system_prompt: You find and summarise sources.
routing:
  keyword:
    rules:
      - { keywords: ["代码", "编程", "debug", "code", "bug"], agent: coder }
      - { keywords: ["搜索", "调研", "查资料", "research", "paper"], agent: researcher }
channels:
  matrix:
    dm_policy: pairing                    # strangers get a code: agentbus pairing approve CODE
    allow_from: ["@*:$SERVER_NAME"]       # people on this homeserver need none
    groups:
      "#project:$SERVER_NAME": { require_mention: false }   # follow-ups continue without @
YAML
fi
CONFIG="$STATE/agentbus.yaml"
# Validates the config too: a mistake stops the demo here with the key that is wrong.
"$BIN" --config "$CONFIG" registration --output "$STATE/registration.yaml" 2>"$STATE/registration.err" \
    || { cat "$STATE/registration.err" >&2; exit 2; }

step "starting Synapse on $HS_URL"
"$HS" start --dir "$STATE/synapse" --port "$HS_PORT" --server-name "$SERVER_NAME" --registration "$STATE/registration.yaml"

step "starting agentbus on 127.0.0.1:$AS_PORT (log: $STATE/agentbus.log)"
"$BIN" --config "$CONFIG" serve >>"$STATE/agentbus.log" 2>&1 &
AGENTBUS_PID=$!
echo "$AGENTBUS_PID" > "$STATE/agentbus.pid"
trap 'echo; stop_all; echo "demo stopped"' INT TERM
for _ in $(seq 1 300); do
    if ! kill -0 "$AGENTBUS_PID" 2>/dev/null; then
        tail -n 20 "$STATE/agentbus.log" >&2
        die "agentbus exited during startup (log above)"
    fi
    grep -q "agentbus is running" "$STATE/agentbus.log" && break
    sleep 0.2
done

step "creating the demo user and the #project room"
if [ ! -f "$STATE/demo-password" ]; then
    python3 -c 'import secrets; print(secrets.token_urlsafe(12))' > "$STATE/demo-password"
fi
PASSWORD="$(cat "$STATE/demo-password")"
"$HS" register --dir "$STATE/synapse" --user demo --password "$PASSWORD" >/dev/null 2>&1 \
    || die "cannot create the demo user (see $STATE/synapse/synapse.log)"

json() { python3 -c 'import json,sys; print(json.load(sys.stdin)'"$1"')'; }
TOKEN="$(curl -sf -X POST "$HS_URL/_matrix/client/v3/login" -H 'content-type: application/json' \
    -d "{\"type\":\"m.login.password\",\"identifier\":{\"type\":\"m.id.user\",\"user\":\"demo\"},\"password\":\"$PASSWORD\"}" \
    | json '["access_token"]')" || die "cannot log in as the demo user"
ALIAS="%23project:$SERVER_NAME"
if ! curl -sf "$HS_URL/_matrix/client/v3/directory/room/$ALIAS" -H "Authorization: Bearer $TOKEN" >/dev/null; then
    curl -sf -X POST "$HS_URL/_matrix/client/v3/createRoom" -H "Authorization: Bearer $TOKEN" \
        -H 'content-type: application/json' \
        -d "{\"name\":\"project\",\"room_alias_name\":\"project\",\"preset\":\"private_chat\",
             \"topic\":\"agentbus demo: @damon, @coder and @researcher are here. Mention one, say @all, or just ask about code or research.\",
             \"invite\":[\"@damon:$SERVER_NAME\",\"@coder:$SERVER_NAME\",\"@researcher:$SERVER_NAME\"]}" >/dev/null \
        || die "cannot create #project"
fi

if grep -q "api: echo" "$CONFIG"; then
    MODEL_NOTE="The agents run on the built-in ECHO provider: they repeat what you say. This is not a
model. To use a real one, stop the demo, delete $CONFIG and start it again with
OPENAI_BASE_URL, OPENAI_API_KEY and OPENAI_MODEL set (any OpenAI-compatible endpoint), or edit
its providers: section."
else
    MODEL_NOTE="The agents use the model at $OPENAI_BASE_URL (provider 'model' in $CONFIG)."
fi

cat <<EOF

agentbus demo is running.

  Homeserver   $HS_URL   (server name: $SERVER_NAME)
  User         @demo:$SERVER_NAME
  Password     $PASSWORD
  Room         #project:$SERVER_NAME  (damon, coder and researcher are in it)

Connect Element (or any Matrix client) to $HS_URL as "demo" with that password, open
#project and write "@coder hello" — or start a direct chat with @damon:$SERVER_NAME.

Or right here, in another terminal:

  $BIN --config $CONFIG say --room '#project:$SERVER_NAME' --as demo --password '$PASSWORD' "@coder hello"
  $BIN --config $CONFIG say --room '#project:$SERVER_NAME' --as demo --password '$PASSWORD' --replies 3 "@all 大家好"

Ask who would answer, and why, without sending anything:

  $BIN --config $CONFIG route --room '#project:$SERVER_NAME' --sender @demo:$SERVER_NAME "帮我看看这段代码"

$MODEL_NOTE

agentbus log: $STATE/agentbus.log    Stop: Ctrl-C here (or scripts/demo.sh stop).
EOF

wait "$AGENTBUS_PID" || true
stop_all
