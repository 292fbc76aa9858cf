#!/usr/bin/env bash
# Checks a deployment of agentbus from the outside, the way its operator would by hand, and
# says for each check OK, WARN or FAIL — with the fix to try for the last two:
#
#   scripts/diagnose.sh [--config PATH] [--registration PATH] [--user USER] [--room ROOM] [--agent ID]
#
#   --config        agentbus.yaml (default: $AGENTBUS_CONFIG, else ./agentbus.yaml)
#   --registration  the registration file the homeserver loads (default:
#                   $AGENTBUS_REGISTRATION, else registration.yaml beside the config)
#   --user          a person on the homeserver for the round trip (default:
#                   $AGENTBUS_DIAGNOSE_USER); the password comes from $AGENTBUS_PASSWORD
#   --room          the room of the round trip (default: #agentbus-diagnostics-USER:SERVER,
#                   created with the agent when missing)
#   --agent         the agent of the round trip (default: the first on an `echo` provider)
#
# Environment: AGENTBUS_BIN, the agentbus binary (default: `agentbus` on PATH, else the
# repository's target/release or target/debug build); API keys in the variables the config's
# providers name (never printed).
#
# Checks: the config; the homeserver's /_matrix/client/versions; TLS certificates of https
# URLs; the registration file against the config; agentbus's /health and /ready; the
# homeserver's ping of agentbus; `agentbus check`; a round trip through an echo agent; each
# provider with a one-token request; the data directory's free space.
#
# Exit status: 0 when nothing FAILed (WARNs allowed), 1 when a check FAILed, 2 on bad usage.
# Needs bash, curl, python3 with PyYAML (python3-yaml), df, and openssl for https URLs.
set -u

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PROG="$(basename "$0")"
CONFIG="${AGENTBUS_CONFIG:-agentbus.yaml}"
REGISTRATION="${AGENTBUS_REGISTRATION:-}"
DIAG_USER="${AGENTBUS_DIAGNOSE_USER:-}"
DIAG_ROOM=""
DIAG_AGENT=""

usage() {
    sed -n '5,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --config) [ $# -ge 2 ] || usage; CONFIG="$2"; shift 2 ;;
        --registration) [ $# -ge 2 ] || usage; REGISTRATION="$2"; shift 2 ;;
        --user) [ $# -ge 2 ] || usage; DIAG_USER="$2"; shift 2 ;;
        --room) [ $# -ge 2 ] || usage; DIAG_ROOM="$2"; shift 2 ;;
        --agent) [ $# -ge 2 ] || usage; DIAG_AGENT="$2"; shift 2 ;;
        -h | --help) usage 0 ;;
        *) printf '%s: unknown argument %s\n' "$PROG" "$1" >&2; usage ;;
    esac
done

FAILS=0
WARNS=0
# report LEVEL TEXT: one result line.
report() {
    case "$1" in
        FAIL) FAILS=$((FAILS + 1)) ;;
        WARN) WARNS=$((WARNS + 1)) ;;
    esac
    printf '%-4s %s\n' "$1" "$2"
}
# Result lines produced by a helper ("LEVEL text" each), counted like report's.
relay() {
    local level text
    while IFS= read -r line; do
        level="${line%% *}"
        text="${line#* }"
        case "$level" in
            OK | WARN | FAIL) report "$level" "$text" ;;
            *) printf '%s\n' "$line" ;;
        esac
    done
}
finish() {
    printf '\n%d failed, %d warnings\n' "$FAILS" "$WARNS"
    [ "$FAILS" -eq 0 ]
    exit $?
}

WORK="$(mktemp -d)" || { echo "$PROG: cannot create a temporary directory" >&2; exit 1; }
chmod 700 "$WORK"
trap 'rm -rf "$WORK"' EXIT

# ------------------------------------------------------------------ helpers --

# The Python side: YAML, JSON and the Matrix and provider requests that carry tokens (so
# no secret ever reaches a command line). `py COMMAND ARGS...`.
read -r -d '' PY <<'PY'
import json, os, re, shlex, sys, time, urllib.error, urllib.parse, urllib.request

def out(level, text):
    print(f"{level} {text}", flush=True)

def load_yaml(path):
    import yaml
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}

def request(method, url, body=None, headers=None, timeout=10):
    """(status, parsed JSON or text); status 0 when nothing answered (text: why)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except Exception as e:
        return 0, str(getattr(e, "reason", e))
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")[:300]

def error_text(body):
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            err = err.get("message") or err.get("type")
        code = body.get("errcode")
        return " ".join(str(x) for x in (code, err) if x) or json.dumps(body)[:200]
    return str(body)[:200]

def as_dict(value):
    return value if isinstance(value, dict) else {}

def cmd_config(path):
    """Shell assignments for what the checks need of the config."""
    c = load_yaml(path)
    hs = as_dict(c.get("homeserver"))
    app = as_dict(c.get("appservice"))
    store = as_dict(c.get("store"))
    providers = as_dict(c.get("providers"))
    agents = [a for a in (c.get("agents") or []) if isinstance(a, dict)]
    bind = str(app.get("bind") or "127.0.0.1:9000")
    as_url = str(app.get("url") or f"http://{bind}").rstrip("/")
    data = os.path.join(os.path.dirname(os.path.abspath(path)), str(store.get("path") or "data"))
    echo = [str(a.get("id")) for a in agents
            if as_dict(providers.get(a.get("provider"))).get("api") == "echo"]
    urls = [str(hs.get("url") or ""), as_url] + [
        str(as_dict(p).get("base_url") or "") for p in providers.values()]
    https = sorted({u for u in urls if u.startswith("https://")})
    values = {
        "HS_URL": str(hs.get("url") or "").rstrip("/"),
        "SERVER_NAME": str(hs.get("server_name") or ""),
        "AS_ID": str(app.get("id") or "agentbus"),
        "AS_URL": as_url,
        "DATA_DIR": os.path.normpath(data),
        "ECHO_AGENTS": " ".join(echo),
        "HTTPS_URLS": " ".join(https),
    }
    for k, v in values.items():
        print(f"{k}={shlex.quote(v)}")

def cmd_registration(file, expected_file, config_path):
    """The homeserver's registration file against the one agentbus derives from its config."""
    try:
        got = load_yaml(file)
    except Exception as e:
        out("FAIL", f"registration {file}: cannot read it as YAML ({e}) — fix: "
            f"regenerate it with `agentbus --config {config_path} registration --output {file}`")
        return
    want = load_yaml(expected_file)
    regen = (f"regenerate it with `agentbus --config {config_path} registration --output {file}` "
             "and restart the homeserver")
    bad = False
    for key in ("as_token", "hs_token"):
        if got.get(key) != want.get(key):
            bad = True
            out("FAIL", f"registration {key}: the {key} in {file} differs from the config's "
                f"(appservice.{key}, its env override or the data directory's tokens file) — fix: {regen}")
    for key in ("url", "id", "sender_localpart"):
        g, w = str(got.get(key) or "").rstrip("/"), str(want.get(key) or "").rstrip("/")
        if g != w:
            bad = True
            out("FAIL", f"registration {key}: {file} says {g!r}, the config means {w!r} — fix: {regen}")
    c = load_yaml(config_path)
    server = as_dict(c.get("homeserver")).get("server_name", "")
    ids = [str(a.get("id")) for a in (c.get("agents") or []) if isinstance(a, dict)]
    ids += [str(t.get("id")) for t in (c.get("teams") or []) if isinstance(t, dict)]
    regexes = [str(n.get("regex", "")) for n in
               (as_dict(got.get("namespaces")).get("users") or []) if isinstance(n, dict)]
    missing = []
    for i in ids:
        user = f"@{i}:{server}"
        if not any(re.match(r, user) for r in regexes if r):
            missing.append(user)
    if missing:
        bad = True
        out("FAIL", f"registration namespaces: {', '.join(missing)} not in the users namespaces of "
            f"{file}, so the homeserver sends agentbus nothing for them — fix: {regen}")
    if not bad:
        out("OK", f"registration {file} matches the config (as_token, hs_token, url "
            f"{want.get('url')}, namespaces cover {len(ids)} agents and teams)")

def cmd_ping(hs_url, as_id, expected_file, as_url):
    token = load_yaml(expected_file).get("as_token", "")
    url = f"{hs_url}/_matrix/client/v1/appservice/{urllib.parse.quote(as_id)}/ping"
    status, body = request("POST", url, {}, {"Authorization": f"Bearer {token}"}, timeout=40)
    if status == 200:
        ms = as_dict(body).get("duration_ms", "?")
        out("OK", f"ping: the homeserver reached agentbus at {as_url} ({ms} ms)")
    elif status == 0:
        out("FAIL", f"ping: cannot ask the homeserver at {hs_url} to ping agentbus ({body}) — fix: "
            "start the homeserver first")
    elif as_dict(body).get("errcode") == "M_BAD_STATUS" and body.get("status") in (401, 403):
        out("FAIL", f"ping: agentbus at {as_url} refused the homeserver's ping (HTTP "
            f"{body['status']}): the homeserver's registration has another hs_token than agentbus "
            "— fix: regenerate it (agentbus registration) and restart the homeserver")
    elif as_dict(body).get("errcode") == "M_BAD_STATUS":
        out("FAIL", f"ping: agentbus at {as_url} answered the homeserver's ping with HTTP "
            f"{body.get('status', '?')} — fix: is it agentbus that listens there? See its log")
    elif status in (401, 403):
        out("FAIL", f"ping: the homeserver refused our as_token ({error_text(body)}) — fix: load the "
            "registration file in the homeserver (app_service_config_files) and restart it")
    else:
        out("FAIL", f"ping: the homeserver cannot reach agentbus at {as_url} (HTTP {status}: "
            f"{error_text(body)}) — fix: start agentbus (agentbus serve), and check appservice.url "
            "and the registration's url are reachable from the homeserver")

READY_FIXES = {
    "store": "free disk space and check the data directory is writable by agentbus's user",
    "homeserver": "start the homeserver, or correct homeserver.url",
    "appservice_ping": "see the ping line below",
}

def cmd_ready(as_url):
    status, body = request("GET", f"{as_url}/ready", timeout=15)
    if status == 0:
        out("FAIL", f"ready: nothing answers at {as_url}/ready ({body}) — fix: start agentbus "
            "(agentbus serve) and check appservice.bind / appservice.url")
        return
    checks = as_dict(as_dict(body).get("checks"))
    if not checks:
        out("FAIL", f"ready: {as_url}/ready answered HTTP {status} without checks: "
            f"{error_text(body)} — fix: is it agentbus that listens there?")
        return
    failing = False
    for name, check in checks.items():
        check = as_dict(check)
        if name == "providers":
            for pname, p in as_dict(check.get("providers")).items():
                p = as_dict(p)
                if p.get("state") == "failing":
                    out("WARN", f"ready: provider {pname}'s last model call failed: "
                        f"{p.get('error', '?')} — fix: see the provider lines below")
            continue
        if check.get("ok") is False:
            failing = True
            fix = READY_FIXES.get(name, "see agentbus's log for it")
            out("FAIL", f"ready: {name} failing: {check.get('detail', '?')} — fix: {fix}")
    if status == 200 and not failing:
        out("OK", f"ready: {as_url}/ready is ready ({', '.join(sorted(checks))})")
    elif not failing:
        out("FAIL", f"ready: {as_url}/ready answered HTTP {status}: {error_text(body)}")

def cmd_providers(config_path):
    c = load_yaml(config_path)
    providers = as_dict(c.get("providers"))
    agents = [a for a in (c.get("agents") or []) if isinstance(a, dict)]
    defaults = {"openai-completions": "https://api.openai.com/v1",
                "anthropic-messages": "https://api.anthropic.com",
                "ollama": "http://127.0.0.1:11434"}
    for name, p in providers.items():
        p = as_dict(p)
        api = p.get("api")
        if api == "echo":
            out("OK", f"provider {name}: built-in echo, nothing to reach")
            continue
        base = str(p.get("base_url") or defaults.get(api, "")).rstrip("/")
        model = next((str(a["model"]) for a in agents
                      if a.get("provider") == name and a.get("model")), None)
        if model is None and p.get("models"):
            model = str(as_dict(p["models"][0]).get("id"))
        headers = {str(k): str(v) for k, v in as_dict(p.get("headers")).items()}
        env = p.get("api_key_env")
        key = os.environ.get(env, "") if env else ""
        if env and not key:
            out("FAIL", f"provider {name}: ${env} is not set here, so its key is unknown — fix: "
                f"export {env} (in agentbus's environment too) and run this again")
            continue
        if api == "ollama":
            if key:
                headers["Authorization"] = f"Bearer {key}"
            url, body, method = f"{base}/api/tags", None, "GET"
        elif api == "anthropic-messages":
            if key:
                headers["x-api-key"] = key
            headers["anthropic-version"] = "2023-06-01"
            url, method = f"{base}/v1/messages", "POST"
            body = {"model": model, "max_tokens": 1,
                    "messages": [{"role": "user", "content": "hi"}]}
        else:
            if key:
                headers["Authorization"] = f"Bearer {key}"
            url, method = f"{base}/chat/completions", "POST"
            body = {"model": model, "max_tokens": 1, "stream": False,
                    "messages": [{"role": "user", "content": "hi"}]}
        if method == "POST" and not model:
            out("WARN", f"provider {name}: no agent names a model for it, nothing to ask — fix: "
                "give an agent a model on it, or list one under models:")
            continue
        status, answer = request(method, url, body, headers, timeout=30)
        what = f"{method} {url}" + (f" (model {model}, 1 token)" if method == "POST" else "")
        # Ollama lists what it has pulled: a model it lacks fails every answer.
        listed = api == "ollama" and "models" in as_dict(answer)
        pulled = [str(as_dict(m).get("name")) for m in as_dict(answer).get("models") or []]
        has_model = model in pulled or f"{model}:latest" in pulled
        if 200 <= status < 300 and listed and model and not has_model:
            out("FAIL", f"provider {name}: {what} answered, but the model {model} is not pulled "
                f"(it has: {', '.join(pulled) or 'none'}) — fix: ollama pull {model}")
        elif 200 <= status < 300:
            note = f" (model {model} is pulled)" if listed and model else ""
            out("OK", f"provider {name}: {what} answered {status}{note}")
        elif status == 0:
            out("FAIL", f"provider {name}: {what} got no answer ({answer}) — fix: check base_url "
                "and that this machine can reach it")
        elif status in (401, 403):
            out("FAIL", f"provider {name}: {what} refused the key ({status}: {error_text(answer)}) "
                f"— fix: check the key in ${env or '(no api_key_env set)'}")
        elif status == 404:
            out("FAIL", f"provider {name}: {what} answered 404 ({error_text(answer)}) — fix: check "
                "base_url (OpenAI-compatible: up to and including /v1) and the model name")
        else:
            out("FAIL", f"provider {name}: {what} answered {status}: {error_text(answer)} — fix: "
                "see the provider's status page or the model name")

def cmd_round_room(hs_url, user, room, agent, server):
    """Logs in, finds or creates the diagnostics room with the agent in it and waits until
    the agent has joined. Prints the room ID, or `FAIL …` / `WARN …`."""
    password = os.environ.get("AGENTBUS_PASSWORD", "")
    ident = {"type": "m.id.user", "user": user}
    status, body = request("POST", f"{hs_url}/_matrix/client/v3/login",
                           {"type": "m.login.password", "identifier": ident, "password": password})
    if status != 200:
        out("FAIL", f"round trip: cannot log in as {user} ({status}: {error_text(body)}) — fix: "
            "check --user and AGENTBUS_PASSWORD")
        return
    token, me = body["access_token"], body["user_id"]
    auth = {"Authorization": f"Bearer {token}"}
    agent_id = f"@{agent}:{server}"
    try:
        local = me[1:].split(":", 1)[0]
        alias = room or f"#agentbus-diagnostics-{local}:{server}"
        if alias.startswith("!"):
            room_id = alias
        else:
            q = urllib.parse.quote(alias, safe="")
            status, body = request("GET", f"{hs_url}/_matrix/client/v3/directory/room/{q}", headers=auth)
            if status == 200:
                room_id = body["room_id"]
            elif room:
                out("FAIL", f"round trip: room {room} not found ({status}: {error_text(body)}) — "
                    "fix: pass an existing room with --room, or leave it out")
                return
            else:
                status, body = request("POST", f"{hs_url}/_matrix/client/v3/createRoom", {
                    "room_alias_name": alias[1:].split(":", 1)[0], "name": "agentbus diagnostics",
                    "preset": "trusted_private_chat", "is_direct": True, "invite": [agent_id],
                    "topic": "scripts/diagnose.sh checks agentbus end to end here"}, auth)
                if status != 200:
                    out("FAIL", f"round trip: cannot create {alias} ({status}: {error_text(body)})")
                    return
                room_id = body["room_id"]
        rid = urllib.parse.quote(room_id, safe="")
        request("POST", f"{hs_url}/_matrix/client/v3/join/{rid}", {}, auth)
        deadline = time.monotonic() + 30
        invited = False
        while True:
            status, body = request("GET", f"{hs_url}/_matrix/client/v3/rooms/{rid}/joined_members",
                                   headers=auth)
            if status == 200 and agent_id in as_dict(body.get("joined")):
                break
            if not invited:
                request("POST", f"{hs_url}/_matrix/client/v3/rooms/{rid}/invite",
                        {"user_id": agent_id}, auth)
                invited = True
            if time.monotonic() > deadline:
                out("FAIL", f"round trip: {agent_id} did not join {alias} within 30 s — fix: is "
                    "agentbus running, and does its log say why it declined the invite?")
                return
            time.sleep(0.5)
        print(room_id)
    finally:
        request("POST", f"{hs_url}/_matrix/client/v3/logout", {}, auth)

cmd, args = sys.argv[1], sys.argv[2:]
try:
    import yaml  # noqa: F401
except ImportError:
    out("FAIL", "python3 has no YAML module — fix: install it (apt-get install python3-yaml, or "
        "pip install pyyaml) and run this again")
    sys.exit(3)
try:
    globals()[f"cmd_{cmd}"](*args)
except Exception as e:  # a check that breaks is a failed check, not a silent one
    out("FAIL", f"{cmd}: the check itself failed ({type(e).__name__}: {e}) — fix: report it with this line")
PY

py() { python3 -c "$PY" "$@"; }

# The agentbus binary: $AGENTBUS_BIN, else one on PATH, else the repository's build.
find_bin() {
    if [ -n "${AGENTBUS_BIN:-}" ]; then
        echo "$AGENTBUS_BIN"
    elif command -v agentbus >/dev/null 2>&1; then
        command -v agentbus
    else
        local dir="${CARGO_TARGET_DIR:-$ROOT/target}" build
        for build in release debug; do
            [ -x "$dir/$build/agentbus" ] && { echo "$dir/$build/agentbus"; return; }
        done
    fi
}

# ------------------------------------------------------------------- checks --

command -v python3 >/dev/null 2>&1 || {
    report FAIL "python3 not found; it reads the YAML files — fix: install python3 and python3-yaml"
    finish
}
command -v curl >/dev/null 2>&1 || {
    report FAIL "curl not found — fix: install curl"
    finish
}

BIN="$(find_bin)"
if [ -z "$BIN" ] || ! command -v "$BIN" >/dev/null 2>&1; then
    report FAIL "agentbus binary not found${BIN:+ at $BIN} — fix: set AGENTBUS_BIN, or build it: cargo build --release"
    finish
fi

# The config: agentbus itself validates it, and derives the registration it means.
if ! [ -r "$CONFIG" ]; then
    report FAIL "config $CONFIG cannot be read — fix: pass --config PATH (or set AGENTBUS_CONFIG)"
    finish
fi
EXPECTED="$WORK/expected-registration.yaml"
if "$BIN" --config "$CONFIG" registration --output - >"$EXPECTED" 2>"$WORK/config.err"; then
    if ! summary="$(py config "$CONFIG" 2>"$WORK/py.err")"; then
        report FAIL "config $CONFIG: cannot read it here: $(tail -n 1 "$WORK/py.err") — fix: install python3-yaml"
        finish
    fi
    eval "$summary"
    report OK "config $CONFIG is valid (homeserver $HS_URL, appservice $AS_URL)"
else
    report FAIL "config $CONFIG is invalid: $(tr '\n' ' ' <"$WORK/config.err")— fix: correct the keys named"
    finish
fi

# The homeserver answers the client API.
if versions="$(curl -sS --max-time 10 "$HS_URL/_matrix/client/versions" 2>"$WORK/curl.err")" \
    && spec="$(printf '%s' "$versions" | python3 -c \
    'import json,sys; print(json.load(sys.stdin)["versions"][-1])' 2>/dev/null)"; then
    report OK "homeserver $HS_URL answers /_matrix/client/versions (spec $spec)"
    HS_UP=1
else
    why="$(head -n 1 "$WORK/curl.err")"
    report FAIL "homeserver $HS_URL/_matrix/client/versions: ${why:-no Matrix versions answer} — fix: start the homeserver, or correct homeserver.url"
    HS_UP=0
fi

# TLS certificates of every https URL.
for url in $HTTPS_URLS; do
    hostport="${url#https://}"
    hostport="${hostport%%/*}"
    host="${hostport%%:*}"
    [ "$host" = "$hostport" ] && hostport="$host:443"
    if ! command -v openssl >/dev/null 2>&1; then
        report WARN "tls $hostport: openssl not found, certificate not checked — fix: install openssl"
        continue
    fi
    openssl s_client -connect "$hostport" -servername "$host" -verify_hostname "$host" \
        </dev/null >"$WORK/tls" 2>/dev/null
    end="$(openssl x509 -noout -enddate <"$WORK/tls" 2>/dev/null)"
    end="${end#notAfter=}"
    verify="$(sed -n 's/^ *Verify return code: //p' "$WORK/tls" | tail -n 1)"
    if [ -z "$end" ] || ! end_s="$(date -d "$end" +%s 2>/dev/null)"; then
        report FAIL "tls $hostport: no certificate could be read — fix: check the server answers TLS there"
        continue
    fi
    days=$(((end_s - $(date +%s)) / 86400))
    if [ "$end_s" -le "$(date +%s)" ]; then
        report FAIL "tls $hostport: the certificate expired on $end — fix: renew it (certbot renew) and reload the server"
    elif [ -n "$verify" ] && [ "${verify%% *}" != 0 ]; then
        report FAIL "tls $hostport: the certificate is not trusted here (openssl verify: $verify) — fix: serve the full chain from a public CA, for the name $host"
    elif [ "$days" -lt 14 ]; then
        report WARN "tls $hostport: the certificate expires in $days days ($end) — fix: renew it now (certbot renew)"
    else
        report OK "tls $hostport: the certificate is valid for $days more days"
    fi
done

# The registration file the homeserver loads against the config.
if [ -z "$REGISTRATION" ] && [ -f "$(dirname "$CONFIG")/registration.yaml" ]; then
    REGISTRATION="$(dirname "$CONFIG")/registration.yaml"
fi
if [ -z "$REGISTRATION" ]; then
    report WARN "registration: no file to compare — fix: pass --registration PATH, the file in the homeserver's app_service_config_files"
elif ! [ -r "$REGISTRATION" ]; then
    report FAIL "registration $REGISTRATION cannot be read — fix: pass --registration PATH, the file the homeserver loads"
else
    relay < <(py registration "$REGISTRATION" "$EXPECTED" "$CONFIG" 2>&1)
fi

# The running agentbus: alive, ready, and reached by the homeserver.
status="$(curl -s -o "$WORK/health" -w '%{http_code}' --max-time 10 "$AS_URL/health" 2>/dev/null)"
if [ "$status" = 200 ]; then
    report OK "health: $AS_URL/health answers 200"
    AS_UP=1
else
    report FAIL "health: $AS_URL/health answers ${status/000/nothing} — fix: start agentbus (agentbus serve) and check appservice.bind / appservice.url; its log says why it stopped"
    AS_UP=0
fi
relay < <(py ready "$AS_URL" 2>&1)
if [ "$HS_UP" = 1 ]; then
    relay < <(py ping "$HS_URL" "$AS_ID" "$EXPECTED" "$AS_URL" 2>&1)
else
    report FAIL "ping: the homeserver is down, so it cannot reach agentbus at $AS_URL — fix: start the homeserver first"
fi

# agentbus's own startup checks (tokens, ping both ways).
if [ "$AS_UP" = 1 ]; then
    note=""
else
    note=" (with a temporary listener: agentbus serve is not running)"
fi
check_out="$(timeout 120 "$BIN" --config "$CONFIG" check 2>&1)"
code=$?
while IFS= read -r line; do
    case "$line" in
        ⚠*) report WARN "agentbus check: ${line#⚠ }" ;;
    esac
done <<<"$check_out"
if [ "$code" -eq 0 ]; then
    report OK "agentbus check passed$note (config, as_token, ping both ways)"
else
    case "$code" in
        2) what="config invalid" ;;
        3) what="homeserver unreachable" ;;
        4) what="as_token rejected" ;;
        5) what="homeserver cannot reach agentbus" ;;
        6) what="local setup (store, port or token file)" ;;
        124) what="timed out after 120 s" ;;
        *) what="exit $code" ;;
    esac
    last="$(grep '✗' <<<"$check_out" | tail -n 1)"
    report FAIL "agentbus check: $what$note: ${last:-$(tail -n 1 <<<"$check_out")}"
fi

# End to end: a person says something to an echo agent and sees its answer.
agent="${DIAG_AGENT:-${ECHO_AGENTS%% *}}"
if [ -z "$agent" ]; then
    report WARN "round trip: no agent on the built-in echo provider to talk to — fix: add one (providers: { diag: { api: echo } } and an agent { id: diagnostics, provider: diag }), regenerate the registration, restart the homeserver and agentbus"
elif [ -z "$DIAG_USER" ] || [ -z "${AGENTBUS_PASSWORD:-}" ]; then
    report WARN "round trip: skipped, no person to send as — fix: --user USER (a person on the homeserver, let in by channels.matrix) with AGENTBUS_PASSWORD set"
elif [ "$HS_UP" = 0 ] || [ "$AS_UP" = 0 ]; then
    report FAIL "round trip: skipped, the $([ "$HS_UP" = 0 ] && echo homeserver || echo appservice) is down — fix: the lines above"
else
    room="$(py round_room "$HS_URL" "$DIAG_USER" "$DIAG_ROOM" "$agent" "$SERVER_NAME" 2>&1)"
    if [[ "$room" == '!'* ]]; then
        nonce="diagnose-$(date +%s)-$$"
        said="$(timeout 90 "$BIN" --config "$CONFIG" say --room "$room" --as "$DIAG_USER" \
            --timeout 60s "@$agent $nonce" 2>&1)"
        if grep -q "$nonce" <<<"$said"; then
            report OK "round trip: @$agent answered in $room"
        elif grep -qi "pairing code" <<<"$said"; then
            report FAIL "round trip: @$agent answered with a pairing code: $DIAG_USER is not let in — fix: agentbus pairing approve CODE, or add the user to channels.matrix.allow_from"
        else
            report FAIL "round trip: no answer from @$agent in $room: $(tail -n 1 <<<"$said") — fix: see agentbus's log for that room; is $DIAG_USER let in by channels.matrix?"
        fi
    elif [ -n "$room" ]; then
        relay <<<"$room"
    else
        report FAIL "round trip: could not set up the room (no answer from the helper)"
    fi
fi

# Each provider, with one token.
relay < <(py providers "$CONFIG" 2>&1)

# Free space where the data lives.
dir="$DATA_DIR"
while ! [ -d "$dir" ]; do dir="$(dirname "$dir")"; done
read -r avail_kb used_kb < <(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 { print $4, $3 }')
if [ -z "${avail_kb:-}" ]; then
    report WARN "disk: cannot read the free space of $dir — fix: check df works there"
else
    total=$((avail_kb + used_kb))
    pct=$((total > 0 ? avail_kb * 100 / total : 0))
    mb=$((avail_kb / 1024))
    if [ "$pct" -lt 2 ] || [ "$mb" -lt 200 ]; then
        report FAIL "disk: $DATA_DIR has $mb MB ($pct%) free — fix: free space now; agentbus stops taking events when the store cannot write"
    elif [ "$pct" -lt 10 ]; then
        report WARN "disk: $DATA_DIR has $mb MB ($pct%) free — fix: free space or grow the disk soon"
    else
        report OK "disk: $DATA_DIR has $mb MB ($pct%) free"
    fi
fi

finish
