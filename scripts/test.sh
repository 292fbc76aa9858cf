#!/usr/bin/env bash
# The whole test suite, from a clean checkout: installs what it needs (a pinned Synapse
# into a cached venv), checks formatting and lints, then runs every test — unit, handler,
# store conformance, and end-to-end against a real Synapse started by our own script.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "Synapse for the end-to-end tests (cached after the first run)"
scripts/dev-homeserver.sh install

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test --all-targets"
cargo test --all-targets --locked

step "all tests passed"
