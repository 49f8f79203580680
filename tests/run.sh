#!/usr/bin/env bash
# README's test command: every test of the workspace. Tests that need network namespaces run when
# this runs as root (CI does) and are reported as failures, not skips, if their tools are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets --locked 2>&1
