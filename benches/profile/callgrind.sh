#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind (repeatable on a shared machine,
# unlike time). Runs BINARY with the throughput bench's configuration and request for VARIANT
# (`cargo bench --bench throughput -- --write-setup`: one thread, the disk buffer, a file sink,
# port 18080, upstream 127.0.0.1:18081), warms it up for 3 s, then counts SECONDS of sequential
# keep-alive requests from one wrk connection.
#
#   benches/profile/callgrind.sh target/release/postback-proxy pixel 10
#
# Prints the requests, the records that reached the sink, instructions per request over every
# thread, and those of the fast path's connection tasks alone (the request's own work). The
# callgrind output stays in the scratch directory it names, for callgrind_annotate. Needs valgrind
# and wrk; `passthrough` also needs an origin on 127.0.0.1:18081. Cores 0 and 1 are used.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "$1")
variant=${2:-pixel}
secs=${3:-10}
work=$(mktemp -d)
cargo bench -q --bench throughput -- --write-setup "$work" >/dev/null
lua="$work/$variant.lua"
[ -f "$lua" ] || { echo "no variant $variant: $(cd "$work" && ls ./*.lua)" >&2; exit 2; }

taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
  "$bin" -c "$work/proxy.yaml" >"$work/proxy.log" 2>&1 &
proxy=$!
trap 'kill -INT $proxy 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  curl -s -o /dev/null http://127.0.0.1:18080/healthz && break
  sleep 1
done
taskset -c 1 wrk -t1 -c1 -d3s -s "$lua" http://127.0.0.1:18080/ >/dev/null
sleep 2
before=$(cat "$work"/sink/*.jsonl 2>/dev/null | wc -l)
callgrind_control -z "$proxy" >/dev/null
taskset -c 1 wrk -t1 -c1 -d"${secs}s" -s "$lua" http://127.0.0.1:18080/ >"$work/wrk.out"
sleep 3
after=$(cat "$work"/sink/*.jsonl 2>/dev/null | wc -l)
callgrind_control -d "$proxy" >/dev/null
sleep 2
kill -INT $proxy
wait $proxy 2>/dev/null || true
trap - EXIT

requests=$(grep -o '^ *[0-9]* requests' "$work/wrk.out" | awk '{print $1}')
dump=$(ls "$work"/cg.out.* | head -1)
total=$(grep -h '^summary:\|^totals:' "$dump" | head -1 | awk '{print $2}')
# The first (largest) inclusive entry of the fast path's per-connection future.
task=$(callgrind_annotate --inclusive=yes "$dump" 2>/dev/null |
  grep -m1 'FastApp as pingora_core::apps::ServerApp>::process_new::{{closure}}' |
  awk '{gsub(",", "", $1); print $1}' || true)
echo "requests $requests, records $((after - before))"
echo "instructions per request: $((total / requests)) in all, $((${task:-0} / requests)) in the connection tasks"
echo "callgrind output: $dump"
