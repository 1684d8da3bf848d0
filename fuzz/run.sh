#!/usr/bin/env bash
# Builds every cargo-fuzz target of postback-proxy and runs each for a bounded time.
#
#   fuzz/run.sh                      # every target, 60 s each
#   FUZZ_SECONDS=300 fuzz/run.sh     # longer
#   FUZZ_TARGETS="postback frame" fuzz/run.sh
#   FUZZ_SANITIZER=none fuzz/run.sh  # without AddressSanitizer
#
# The stable toolchain is enough: RUSTC_BOOTSTRAP=1 lets it take the nightly flags cargo-fuzz
# passes. Corpora grow in fuzz/corpus/<target>/ (only the seed-* files are committed); a crash
# is written to fuzz/artifacts/<target>/ and reproduced with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -O <target> fuzz/artifacts/<target>/crash-...
# Logs are in fuzz/logs/. Exits 1 when any target crashed (or timed out on one input), 2 when
# the build failed.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
sanitizer=${FUZZ_SANITIZER:-address}
read -r -a targets <<<"${FUZZ_TARGETS:-query route cookie_xff redirect postback frame fast_reader}"
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
if [ "$sanitizer" = address ]; then
  # The cc crate builds C dependencies (zstd, for librdkafka) with -fsanitize=address; librdkafka's
  # own configure script then links test programs against them and needs the ASan runtime too.
  export LDFLAGS="${LDFLAGS:-} -fsanitize=address"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (about 2 minutes)"
  cargo install cargo-fuzz --locked || exit 2
fi

# FUZZ_TARGET_DIR keeps the (large, slow to build) instrumented build outside the work tree.
target_dir=(--target-dir "${FUZZ_TARGET_DIR:-$PWD/fuzz/target}")

start=$(date +%s)
echo "building the fuzz targets (sanitizer: $sanitizer)"
if ! cargo fuzz build -O --sanitizer "$sanitizer" "${target_dir[@]}" 2>fuzz/build.log; then
  tail -40 fuzz/build.log
  exit 2
fi
echo "built in $(($(date +%s) - start)) s"

mkdir -p fuzz/logs
failed=()
printf '%-11s %12s %8s %6s %7s  %s\n' target executions exec/s units rss_mb result
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  dict=()
  case "$t" in query | postback | redirect) dict=(-dict="$PWD/fuzz/dict/postback.dict") ;; esac
  log="fuzz/logs/$t.log"
  cargo fuzz run -O --sanitizer "$sanitizer" "${target_dir[@]}" "$t" "$PWD/fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${dict[@]}" >"$log" 2>&1
  rc=$?
  stat() { grep -m1 "^stat::$1:" "$log" | awk '{print $2}'; }
  execs=$(stat number_of_executed_units)
  rate=$(stat average_exec_per_sec)
  units=$(stat new_units_added)
  rss=$(stat peak_rss_mb)
  if [ $rc -eq 0 ]; then
    result=ok
  else
    artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | cut -d' ' -f5)
    result="CRASH (exit $rc) ${artifact:-see $log}"
    failed+=("$t")
  fi
  printf '%-11s %12s %8s %6s %7s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${units:-?}" "${rss:-?}" "$result"
done
echo "total $(($(date +%s) - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashed: ${failed[*]}"
  for t in "${failed[@]}"; do
    echo "--- $t"
    grep -m1 -A4 -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer)' "fuzz/logs/$t.log"
  done
  exit 1
fi
