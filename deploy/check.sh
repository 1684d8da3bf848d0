#!/usr/bin/env bash
# Checks the operator's kit with the real tools:
#   - systemd-analyze verify on deploy/postback-proxy.service, installed in a scratch root laid
#     out as the unit's comment says (the binary at /usr/local/bin/postback-proxy), so that every
#     ExecStart/ExecReload command is checked to exist and be executable where the unit says;
#   - systemd-analyze security: the unit's exposure score stays at most 2.0;
#   - promtool check rules on deploy/alerts.yml, and promtool test rules on its unit tests
#     (deploy/alerts.test.yml: each alert fires on the series it is meant for);
#   - promtool check rules on the Grafana dashboard's queries (each wrapped in a recording rule,
#     with Grafana's variables given values), so a query that does not parse fails here.
# That every metric those files name is exported is tests/deploy.rs's job.
#
# Needs systemd-analyze (Debian's `systemd`), promtool (Debian's `prometheus`) and python3; run as
# root on Debian it installs what is missing. The binary: $POSTBACK_PROXY_BIN, or a debug build
# made here.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { # need COMMAND PACKAGE
  command -v "$1" >/dev/null && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "deploy/check.sh: installing $2 for $1" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >/dev/null
  fi
  command -v "$1" >/dev/null || { echo "deploy/check.sh: $1 is missing (apt-get install $2)" >&2; exit 1; }
}
need systemd-analyze systemd
need promtool prometheus
need python3 python3

bin="${POSTBACK_PROXY_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --quiet --bin postback-proxy
  bin="${CARGO_TARGET_DIR:-target}/debug/postback-proxy"
fi
[ -x "$bin" ] || { echo "deploy/check.sh: no executable at $bin" >&2; exit 1; }

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT

# The unit, installed as its comment says, in a root that has the system's units (for the targets
# it names), /bin/kill and the binary.
mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/usr/local/bin" "$root/usr/bin"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
ln -s usr/lib "$root/lib"
ln -s usr/bin "$root/bin"
cp "$(readlink -f /bin/kill)" "$root/usr/bin/kill"
install -m 0755 "$bin" "$root/usr/local/bin/postback-proxy"
install -m 0644 deploy/postback-proxy.service "$root/etc/systemd/system/postback-proxy.service"
echo "systemd-analyze verify deploy/postback-proxy.service"
out="$(systemd-analyze verify --root="$root" postback-proxy.service 2>&1)" || {
  echo "$out" >&2
  exit 1
}
# verify warns without failing for some mistakes (an unknown key, a bad value): none allowed.
if grep -v -e 'Too many levels of symbolic links' <<<"$out" | grep -q .; then
  echo "$out" >&2
  exit 1
fi

# And hardened: systemd's own exposure score (0 to 10, lower is better) stays at most 2.0.
echo "systemd-analyze security deploy/postback-proxy.service"
if ! systemd-analyze security --offline=yes --threshold=20 deploy/postback-proxy.service >"$root/security.txt" 2>&1; then
  cat "$root/security.txt" >&2
  echo "deploy/check.sh: the unit's exposure is above 2.0" >&2
  exit 1
fi
tail -1 "$root/security.txt"

echo "promtool check rules deploy/alerts.yml"
promtool check rules deploy/alerts.yml
echo "promtool test rules deploy/alerts.test.yml"
promtool test rules deploy/alerts.test.yml

echo "promtool check rules (the queries of deploy/grafana-dashboard.json)"
python3 - "$root/dashboard-rules.yml" <<'EOF'
import json, sys
dash = json.load(open("deploy/grafana-dashboard.json"))
exprs = []
def walk(panels):
    for p in panels:
        walk(p.get("panels", []))
        exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
walk(dash["panels"])
for var in dash["templating"]["list"]:
    q = var.get("query")
    if isinstance(q, dict) and q.get("query", "").startswith("label_values("):
        # label_values(SELECTOR, LABEL): the selector is PromQL.
        exprs.append(q["query"][len("label_values("):].rsplit(",", 1)[0])
if not exprs:
    sys.exit("the dashboard has no queries")
values = {"$__rate_interval": "5m", "$instance": ".*", "$sink": ".*"}
with open(sys.argv[1], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        for k, v in values.items():
            e = e.replace(k, v)
        if "$" in e:
            sys.exit(f"a variable without a value in: {e}")
        out.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}\n")
EOF
promtool check rules "$root/dashboard-rules.yml"
echo "deploy/check.sh: OK"
