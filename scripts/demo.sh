#!/usr/bin/env bash
# The demo: start a node on the embedded defaults (bundled phantom-trained model), extract the
# real PA chest radiograph RG1 from pydicom-data in each transfer syntax it ships in and a handful
# of synthetic phantoms, print the full records next to the phantoms' ground truth, stop the node.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/debug/cxrfed
PYTHON=.venv/bin/python

echo "== cxrfed demo (research use only, not a diagnostic device) =="
# A node left over from an earlier demo would hold the default port.
"$BIN" node stop >/dev/null 2>&1 || true
"$BIN" node serve --detach

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
echo "== generating 4 phantoms (one per site profile) and extracting them =="
"$BIN" phantom --out "$PHANTOMS" --count 4 --seed 2026 --max-size 1024
"$BIN" extract "$PHANTOMS"/*.dcm

echo
echo "== ground truth of those phantoms (labels.csv) =="
cut -d, -f1,3,4,8- "$PHANTOMS/labels.csv" | column -s, -t 2>/dev/null || cat "$PHANTOMS/labels.csv"

echo
echo "== stored records (one line each) =="
"$BIN" records

echo
echo "== node status =="
"$BIN" node status || true

echo
echo "== services, through server reflection =="
if command -v grpcurl >/dev/null 2>&1; then
    grpcurl -plaintext 127.0.0.1:50051 list
else
    echo "(grpcurl is not installed; with it:)"
    echo "  grpcurl -plaintext 127.0.0.1:50051 list"
    echo "  grpcurl -plaintext 127.0.0.1:50051 cxrfed.v1.NodeService/Status"
fi

echo
"$BIN" node stop
