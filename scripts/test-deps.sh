#!/usr/bin/env bash
# What the suite uses as real clients, installed when missing. Debian packages: dcmtk
# (echoscu, storescu, storescp, dcmqrscp, dsrdump) for the DICOM receiver's, pull's and SR
# export's tests, dicom3tools (dciodvfy) for the SR export's, chromium with its chromedriver
# for the web console's browser tests (and npm when absent). Then axe-core from npm
# (tests/ui, `npm ci` against its lockfile) for their accessibility checks. apt-get runs as
# root, or through sudo when it is available.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v dcmqrscp >/dev/null 2>&1 || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "test-deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    sudo="sudo -n"
  fi
  echo "test-deps: installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -f tests/ui/node_modules/axe-core/axe.min.js ]; then
  echo "test-deps: npm ci (tests/ui: axe-core)"
  npm ci --prefix tests/ui --no-audit --no-fund --loglevel=error
fi
