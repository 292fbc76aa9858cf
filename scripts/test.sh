#!/usr/bin/env bash
# The whole test suite, from a clean checkout: installs what it needs (a pinned Synapse and
# the local model, each into a cached venv), checks formatting and lints, then runs every
# test — unit, handler, store conformance, and end-to-end against a real Synapse and a real
# (tiny) model, both started by our own scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib.sh
. scripts/lib.sh

# A run of the suite builds once; incremental caches would only double the target
# directory (disk, not time, is what a CI machine runs short of). Export 1 to keep them.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "Synapse for the end-to-end tests (cached after the first run)"
scripts/dev-homeserver.sh install

step "local model for tests/local_model.rs (cached; the first run compiles llama.cpp, 10–30 minutes)"
# The test finds the venv and the GGUF through scripts/local-model.sh itself (same
# AGENTBUS_CACHE), so nothing needs exporting; it fails, saying so, if this step was skipped.
scripts/local-model.sh install
scripts/local-model.sh status

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test --all-targets"
cargo test --all-targets --locked

step "all tests passed"
