#!/usr/bin/env bash
# Seeds the fuzz corpora and runs every cargo-fuzz target for SECONDS each (`make fuzz`:
# 600 by default; `make fuzz-smoke`, part of `make test`: a few seconds). Uses libFuzzer with
# a 512 MB RSS limit (the targets decode at most 4 MB, 512×512: more is a finding) and no sanitizer, so that it runs on
# the stable toolchain (RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags). Findings land in
# fuzz/artifacts/TARGET/ and fail the run. The executions per target are printed at the end
# and written to fuzz/last-run.txt.
set -euo pipefail
seconds=${1:-600}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
corpus=fuzz/corpus
mkdir -p "$corpus"/dicom_path "$corpus"/query_parser "$corpus"/proto_messages

# DICOM: pydicom's own test files (the small ones) and phantoms of every transfer syntax.
testfiles=$(.venv/bin/python -c 'import pydicom, os; print(os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files"))')
find "$testfiles" -maxdepth 1 -name '*.dcm' -size -64k -exec cp -n {} "$corpus"/dicom_path/ \;
for ts in explicit implicit rle jpeg-lossless j2k; do
  if [ ! -e "$corpus/dicom_path/phantom-$ts-0.dcm" ]; then
    tmp=$(mktemp -d)
    target/debug/cxrfed phantom --out "$tmp" --count 2 --seed 3 --max-size 64 --transfer-syntax "$ts" --png --jpeg >/dev/null
    i=0
    for f in "$tmp"/*.dcm "$tmp"/*.png "$tmp"/*.jpg; do
      [ -e "$f" ] || continue
      cp "$f" "$corpus/dicom_path/phantom-$ts-$i.${f##*.}"
      i=$((i + 1))
    done
    rm -rf "$tmp"
  fi
done
cp -n fuzz/seeds/query_parser/* "$corpus"/query_parser/

: > fuzz/last-run.txt
status=0
for target in dicom_path query_parser proto_messages; do
  log=$(mktemp)
  if ! cargo fuzz run --fuzz-dir fuzz -s none "$target" "$corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=512 -timeout=20 -print_final_stats=1 \
      >"$log" 2>&1; then
    status=1
    tail -40 "$log"
  fi
  runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo 0)
  peak=$(grep -Eo 'stat::peak_rss_mb: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo ?)
  echo "$target: $runs executions in ${seconds}s, peak RSS ${peak} MB" | tee -a fuzz/last-run.txt
  rm -f "$log"
done
exit $status
