#!/usr/bin/env bash
# User and system CPU time per request of a running server, from /proc/PID/stat: runs
# `wrk -t1 -c64 -d5s` (pinned to core 1) with LUA against 127.0.0.1:PORT and divides the
# utime/stime that the PIDs (the proxy's; nginx's master and workers) gained by the requests.
#
#   cargo bench --bench throughput -- --write-setup /tmp/setup   # the wrk scripts
#   benches/profile/cpu_split.sh proxy /tmp/setup/pixel.lua 18080 $(pgrep -f "postback-proxy -c")
#
# Pin the server to core 0 (`taskset -c 0`) first, and alternate runs between servers.
set -euo pipefail
what=$1 lua=$2 port=$3
shift 3
tick=$(getconf CLK_TCK)
cpu() {
  local u=0 s=0 pu ps
  for p in "$@"; do
    read -r pu ps < <(awk '{print $14, $15}' "/proc/$p/stat")
    u=$((u + pu))
    s=$((s + ps))
  done
  echo "$u $s"
}
read -r u0 s0 < <(cpu "$@")
out=$(taskset -c 1 wrk -t1 -c64 -d5s -s "$lua" "http://127.0.0.1:$port/")
read -r u1 s1 < <(cpu "$@")
requests=$(echo "$out" | grep -o '^ *[0-9]* requests' | awk '{print $1}')
awk -v w="$what" -v r="$requests" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$tick" 'BEGIN {
  printf "%s: %.0f req/s, user %.1f us, sys %.1f us, total %.1f us per request\n",
    w, r / 5, u / t / r * 1e6, s / t / r * 1e6, (u + s) / t / r * 1e6 }'
