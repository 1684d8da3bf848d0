-- Appended by benches/throughput.rs to every generated wrk script: at the end of a run, one line
-- the harness parses. Latencies in microseconds; status_errors counts answers >= 400.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "THROUGHPUT requests=%d duration_us=%d bytes=%d status_errors=%d connect_errors=%d " ..
    "read_errors=%d write_errors=%d timeouts=%d p50_us=%d p99_us=%d p999_us=%d\n",
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write,
    e.timeout, latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
