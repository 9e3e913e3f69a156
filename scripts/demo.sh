#!/usr/bin/env bash
# The demo: start a node on the embedded defaults (bundled phantom-trained model), extract the
# real PA chest radiograph RG1 from pydicom-data in each transfer syntax it ships in and a handful
# of synthetic phantoms, print the full records next to the phantoms' ground truth, stop the node.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/debug/cxrfed
PYTHON=.venv/bin/python

echo "== cxrfed demo (research use only, not a diagnostic device) =="
# The embedded default data directory of `cxrfed node serve`.
DATA_DIR="${CXRFED_NODE_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/cxrfed/node}"
export CXRFED_NODE_DATA_DIR="$DATA_DIR"
# A node left over from an earlier demo would hold the default port.
"$BIN" node stop >/dev/null 2>&1 || true

# Every node serves mutual TLS: a development study CA and the certificates of this demo are
# made on the first run, into the data directory (never real keys; see certs/README.md).
PKI="$DATA_DIR/pki"
if [ ! -f "$PKI/ca/ca.pem" ]; then
    echo
    echo "== creating a development study CA and certificates in $PKI =="
    "$BIN" certs init --out "$PKI/ca" --study demo-study --days 365
    "$BIN" certs issue --ca "$PKI/ca" --role node --name node-local --site local --out "$PKI/node"
    "$BIN" certs issue --ca "$PKI/ca" --role admin --name demo-admin --site local --out "$PKI/admin"
    "$BIN" certs issue --ca "$PKI/ca" --role researcher --name demo-researcher --out "$PKI/researcher"
fi
echo
"$BIN" certs inspect "$PKI/admin/cert.pem"
# Client commands below authenticate as the site admin.
export CXRFED_PROFILE="$PKI/admin/profile.toml"
echo
"$BIN" node serve --detach --ca "$PKI/ca/ca.pem" --cert "$PKI/node/cert.pem" --key "$PKI/node/key.pem"

RG1_DIR=$("$PYTHON" -c "import data_store, os; print(os.path.join(os.path.dirname(data_store.__file__), 'data'))")
echo
echo "== extracting RG1 (PA chest, CR, MONOCHROME1) in each transfer syntax =="
echo "   --force re-extracts with the current model (the data directory may hold records of an"
echo "   earlier run); the JPEG 2000 copies of the same pixels then dedupe to those records"
"$BIN" extract --force "$RG1_DIR"/RG1_UNCR.dcm "$RG1_DIR"/RG1_UNCI.dcm
"$BIN" extract "$RG1_DIR"/RG1_J2KR.dcm "$RG1_DIR"/RG1_J2KI.dcm

echo
PHANTOMS=$(mktemp -d)
trap 'rm -rf "$PHANTOMS"' EXIT
echo "== generating a folder of 24 phantoms (four site profiles) and ingesting it =="
"$BIN" phantom --out "$PHANTOMS" --count 24 --seed 2026 --max-size 1024
"$BIN" ingest "$PHANTOMS" --state "$PHANTOMS/.ingest-state.jsonl" --report "$PHANTOMS/.ingest-rejects.jsonl"

echo
echo "== ground truth of the first phantoms (labels.csv) =="
head -5 "$PHANTOMS/labels.csv" | cut -d, -f1,3,4,8- | column -s, -t 2>/dev/null || head -5 "$PHANTOMS/labels.csv"

echo
echo "== asking questions about one record (English and Chinese) =="
RECORD_ID=$("$BIN" records --limit 1 | "$PYTHON" -c "import json,sys; print(json.loads(sys.stdin.readline())['record_id'])")
"$BIN" ask "$RECORD_ID" "Is the left costophrenic angle blunted?"
"$BIN" ask "$RECORD_ID" "肺野透亮度是否普遍增高?"
"$BIN" ask "$RECORD_ID" "外周肺血管纹理是否明显变细?"
"$BIN" ask "$RECORD_ID" "What colour is the scanner?" || true

echo
echo "== image quality vs analysis confidence (exact, site admin) =="
"$BIN" stats 'crosstab image_quality, analysis_confidence'
"$BIN" stats 'crosstab image_quality, analysis_confidence normalize=row' --plot "$DATA_DIR/quality_vs_confidence.png"
"$BIN" stats 'summary cardiothoracic_ratio by view'

echo
echo "== the same analysis from Python (clients/python), chart included =="
CHART="$DATA_DIR/quality_vs_confidence_python.png"
"$PYTHON" clients/python/examples/quality_vs_confidence.py --out "$CHART"

echo
echo "== stored records (first 3, one JSON line each) =="
"$BIN" records --limit 3

echo
echo "== node status =="
"$BIN" node status || true

echo
echo "== a researcher's certificate does not open the node's records =="
"$BIN" records --profile "$PKI/researcher/profile.toml" || echo "   (refused, as it should be: records are for the site admin)"

echo
echo "== the site admin grants the researcher 2 more epsilon of privacy budget (audited) =="
RESEARCHER="$PKI/researcher/profile.toml"
SPENT=$("$BIN" node budget list --json | "$PYTHON" -c '
import json, sys
spent = [a["epsilon_spent"] for a in json.load(sys.stdin) if a["identity"].endswith("/demo-researcher")]
print(spent[0] if spent else 0)')
"$BIN" node budget set --identity demo-researcher --epsilon "$("$PYTHON" -c "print($SPENT + 2)")"

echo
echo "== the researcher's differentially private statistics (noisy, 95% bounds, small cells withheld) =="
"$BIN" stats --dp --epsilon 0.5 'histogram view' --profile "$RESEARCHER"
"$BIN" stats --dp --epsilon 0.5 'crosstab image_quality, analysis_confidence' --profile "$RESEARCHER"
"$BIN" stats --dp --epsilon 0.5 'mean cardiothoracic_ratio' --profile "$RESEARCHER"
"$BIN" budget --profile "$RESEARCHER"
"$BIN" stats --dp --epsilon 1 'count' --profile "$RESEARCHER" || echo "   (refused: the budget is spent; nothing was released)"

echo
echo "== the audit chain: every release, exact query, export, budget change and label (today) =="
"$BIN" node audit show --since "$(date -u +%F)"
"$BIN" node audit verify

echo
echo "== a three-site federation: coordinator, three nodes dialling out, federated DP queries =="
bash scripts/federation-demo.sh

echo
echo "== services, through server reflection (mutual TLS) =="
GRPCURL_TLS="-cacert $PKI/ca/ca.pem -cert $PKI/admin/cert.pem -key $PKI/admin/key.pem"
if command -v grpcurl >/dev/null 2>&1; then
    grpcurl $GRPCURL_TLS 127.0.0.1:50051 list
else
    echo "(grpcurl is not installed; with it:)"
    echo "  grpcurl $GRPCURL_TLS 127.0.0.1:50051 list"
    echo "  grpcurl $GRPCURL_TLS 127.0.0.1:50051 cxrfed.v1.NodeService/Status"
fi

echo
"$BIN" node stop
