#!/usr/bin/env bash
# The test command: installs what the tests need (once), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TANSU_BIN="${TANSU_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/postback-proxy/tansu/bin/tansu}"
cargo test "$@"
