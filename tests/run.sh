#!/usr/bin/env bash
# README's test command: every test of the workspace. Tests that need network namespaces run when
# this runs as root (CI does) and are reported as failures, not skips, if their tools are missing.
# Formatting is checked first (rustfmt's defaults; `cargo fmt --all` fixes it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo test --workspace --all-targets --locked 2>&1
