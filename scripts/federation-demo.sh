#!/usr/bin/env bash
# A three-hospital federation on loopback: a study CA, a coordinator, three nodes (university,
# community and ICU phantom profiles, each its own data directory and certificate) that dial
# out to the coordinator, a researcher with a budget at each site, and federated DP queries
# whose pooled tables carry their error bounds. Everything is made afresh under $FED and
# stopped at the end. Called by scripts/demo.sh; runs on its own too.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/debug/cxrfed
DATA_DIR="${CXRFED_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/cxrfed/node}"
FED="${CXRFED_FEDERATION_DIR:-$(dirname "$DATA_DIR")/federation}"
COORDINATOR=https://127.0.0.1:50061
SITES=(university community icu)

stop_all() {
    for site in "${SITES[@]}"; do
        "$BIN" node stop --data-dir "$FED/site-$site" >/dev/null 2>&1 || true
    done
    "$BIN" coordinator stop --data-dir "$FED/coordinator" >/dev/null 2>&1 || true
}
stop_all
rm -rf "$FED"
trap stop_all EXIT

echo "== a study CA and certificates: a coordinator, three nodes and their admins, a researcher =="
"$BIN" certs init --out "$FED/pki/ca" --study demo-federation --days 30 >/dev/null
"$BIN" certs issue --ca "$FED/pki/ca" --role coordinator --name coordinator --out "$FED/pki/coordinator" >/dev/null
for site in "${SITES[@]}"; do
    "$BIN" certs issue --ca "$FED/pki/ca" --role node --name "node-$site" --site "site-$site" --out "$FED/pki/node-$site" >/dev/null
    "$BIN" certs issue --ca "$FED/pki/ca" --role admin --name "admin-$site" --site "site-$site" --out "$FED/pki/admin-$site" >/dev/null
done
"$BIN" certs issue --ca "$FED/pki/ca" --role researcher --name rita --out "$FED/pki/rita" >/dev/null
RITA="$FED/pki/rita/profile.toml"
ls "$FED/pki"

echo
echo "== the coordinator =="
"$BIN" coordinator serve --detach --data-dir "$FED/coordinator" --listen 127.0.0.1:50061 \
    --ca "$FED/pki/ca/ca.pem" --cert "$FED/pki/coordinator/cert.pem" --key "$FED/pki/coordinator/key.pem"

port=50071
seed=101
for site in "${SITES[@]}"; do
    echo
    echo "== site-$site: phantoms of the $site profile, a node that dials out, ingest, a budget for rita =="
    "$BIN" phantom --out "$FED/phantoms-$site" --site "$site" --count 40 --seed "$seed" --max-size 256 >/dev/null
    "$BIN" node serve --detach --data-dir "$FED/site-$site" --listen "127.0.0.1:$port" \
        --ca "$FED/pki/ca/ca.pem" --cert "$FED/pki/node-$site/cert.pem" --key "$FED/pki/node-$site/key.pem" \
        --coordinator "$COORDINATOR" --log-level warn
    ADMIN="$FED/pki/admin-$site/profile.toml"
    "$BIN" ingest "$FED/phantoms-$site" --node "https://127.0.0.1:$port" --profile "$ADMIN" \
        --state "$FED/ingest-$site.jsonl" --report "$FED/rejects-$site.jsonl" 2>&1 | grep -v "^rejects listed" | tail -n 2
    CXRFED_PROFILE="$ADMIN" "$BIN" node budget set --data-dir "$FED/site-$site" --identity rita --epsilon 2 >/dev/null
    port=$((port + 1))
    seed=$((seed + 1))
done

echo
echo "== the coordinator's registry of sites =="
for _ in $(seq 1 50); do
    connected=$("$BIN" coordinator sites --coordinator "$COORDINATOR" --profile "$RITA" --json | grep -c '"connected": true' || true)
    [ "$connected" -ge 3 ] && break
    sleep 0.2
done
"$BIN" coordinator sites --coordinator "$COORDINATOR" --profile "$RITA"

echo
echo "== rita's federated DP queries (signed with her key; every site charges her budget there) =="
"$BIN" query 'crosstab image_quality, view' --epsilon 0.5 --min-sites 3 \
    --coordinator "$COORDINATOR" --profile "$RITA" --plot "$FED/quality_by_view.png"
echo
"$BIN" query 'mean cardiothoracic_ratio where view = PA' --epsilon 0.5 --min-sites 2 \
    --coordinator "$COORDINATOR" --profile "$RITA"
echo
echo "== what site-icu recorded (its own audit chain) =="
CXRFED_PROFILE="$FED/pki/admin-icu/profile.toml" "$BIN" node audit show --data-dir "$FED/site-icu" | tail -n 4
