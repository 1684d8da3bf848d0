#!/usr/bin/env bash
# Installs what building and testing postback-proxy needs on a fresh Debian machine (as root).
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: cmake builds zlib-ng, which Pingora's flate2 links; chromium and node run the
# browser test; openssl makes its throw-away certificates.
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
# promtool and systemd-analyze check the operator's kit in deploy/ (deploy/check.sh).
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# playwright-core and td-js-sdk for the browser test (tests/browser/package-lock.json).
if [ ! -d tests/browser/node_modules ]; then
  npm ci --prefix tests/browser --no-audit --no-fund
fi

# Python's msgpack for the Fluentd forward test peer (tests/peers/fluent_peer.py).
python3 -c 'import msgpack' 2>/dev/null || python3 -m pip install --quiet msgpack

# tansu, a Kafka-protocol broker, for the kafka sink's tests. It takes about 25 minutes to build on
# 2 cores, so it is installed once into a cache directory and reused; tests find it via TANSU_BIN
# or at this default place.
cache="${XDG_CACHE_HOME:-$HOME/.cache}/postback-proxy"
if [ ! -x "$cache/tansu/bin/tansu" ]; then
  echo "setup: building tansu into $cache/tansu (about 25 minutes, once)"
  CARGO_TARGET_DIR="$cache/tansu-target" cargo install tansu --version 0.6.0 --features dynostore \
    --locked --root "$cache/tansu"
fi
