#!/usr/bin/env bash
# A three-hospital federation on loopback: a study CA, a coordinator, three nodes (university,
# community and ICU phantom profiles, each its own data directory and certificate) that dial
# out to the coordinator, a researcher with a budget at each site, and federated DP queries
# whose pooled tables carry their error bounds. Everything is made afresh under $FED and
# stopped at the end. Called by scripts/demo.sh; runs on its own too.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/debug/cxrfed
DATA_DIR="${CXRFED_NODE_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/cxrfed/node}"
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

echo
echo "== federated fine-tuning: a new head for a field the study defines (cardiomegaly) =="
# Each site defines the field and labels its own images (here from the phantoms' ground truth:
# cardiothoracic ratio above 0.5); labels and images stay at the site.
# The study admin signs jobs and promotions; every site verifies the signature and its own
# training policy before it trains or installs anything.
"$BIN" certs issue --ca "$FED/pki/ca" --role study-admin --name study-admin --out "$FED/pki/study-admin" >/dev/null
STUDY_ADMIN="$FED/pki/study-admin/profile.toml"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
port=50071
for site in "${SITES[@]}"; do
    ADMIN="$FED/pki/admin-$site/profile.toml"
    "$PY" - "$FED/phantoms-$site/labels.csv" "$FED/cardiomegaly-$site.csv" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
with open(sys.argv[2], "w", newline="") as out:
    w = csv.writer(out)
    w.writerow(["image_sha256", "cardiomegaly"])
    for r in rows:
        w.writerow([r["image_sha256"], str(float(r["cardiothoracic_ratio"]) > 0.5).lower()])
PYEOF
    "$BIN" field define cardiomegaly --type bool --description "cardiothoracic ratio above 0.5" \
        --node "https://127.0.0.1:$port" --profile "$ADMIN" >/dev/null
    echo "site-$site: $("$BIN" annotate import "$FED/cardiomegaly-$site.csv" --node "https://127.0.0.1:$port" --profile "$ADMIN")"
    # Each site admin opts in (training is off by default), on terms fit for phantom-sized
    # data: small held-out sets still report their noisy counts.
    "$BIN" node training-policy set enabled=true min_local_steps=1 min_held_out=1 \
        --data-dir "$FED/site-$site" --profile "$ADMIN" >/dev/null
    port=$((port + 1))
done
cat > "$FED/job.toml" <<'TOMLEOF'
name = "cardiomegaly head"
base = "tiny-phantom-v1"
new_heads = [{ name = "cardiomegaly", kind = "binary" }]
trainable = "heads"        # backbone frozen
algorithm = "fedavg"
rounds = 3
local_epochs = 4
batch_size = 8
learning_rate = 0.02
min_sites = 3
round_deadline_secs = 300
# Sites mask their updates (the coordinator sees only the sum) and report noisy counts.
secure_aggregation = true
metrics_epsilon = 1.0
TOMLEOF
echo
cat "$FED/job.toml"
echo
"$BIN" job start --job "$FED/job.toml" --coordinator "$COORDINATOR" --profile "$STUDY_ADMIN"
echo
echo "== the model registry (every global version with its lineage) =="
"$BIN" registry list --coordinator "$COORDINATOR" --profile "$STUDY_ADMIN"

echo
echo "== promote the last version: every node switches to it and back-fills its records =="
VERSION=$("$BIN" job list --json --coordinator "$COORDINATOR" --profile "$STUDY_ADMIN" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)[-1]["latest_model"])')
"$BIN" registry promote "$VERSION" --coordinator "$COORDINATOR" --profile "$STUDY_ADMIN"
for _ in $(seq 1 100); do
    running=$("$BIN" registry show "$VERSION" --json --coordinator "$COORDINATOR" --profile "$STUDY_ADMIN" | "$PY" -c 'import json, sys; print(len(json.load(sys.stdin)["running_at"]))')
    [ "$running" -ge 3 ] && break
    sleep 0.3
done
"$BIN" registry list --coordinator "$COORDINATOR" --profile "$STUDY_ADMIN" | cut -c1-220
echo
echo "new images at site-icu are extracted by the promoted model, which fills cardiomegaly:"
"$BIN" phantom --out "$FED/phantoms-icu-new" --site icu --count 6 --seed 999 --max-size 256 >/dev/null
cat > "$FED/show.py" <<'PYEOF'
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    ratio = r["findings"]["mediastinum"]["cardiothoracic_ratio"]["value"]
    value = r.get("model_fields", {}).get("cardiomegaly")
    print(f"  {r['record_id']}  model {r['model_id']}  cardiomegaly = {value}  (model's ratio {ratio:.2f})")
PYEOF
"$BIN" extract --node https://127.0.0.1:50073 --profile "$FED/pki/admin-icu/profile.toml" "$FED"/phantoms-icu-new/*.dcm \
    | "$PY" "$FED/show.py"
echo
echo "rita asks the federation about the field (labels first, the model's values elsewhere), with DP:"
"$BIN" query 'histogram cardiomegaly' --epsilon 0.5 --min-sites 3 \
    --coordinator "$COORDINATOR" --profile "$RITA"
