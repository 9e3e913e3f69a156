#!/usr/bin/env bash
# Debian packages whose programs the suite uses as real clients, installed when missing:
# dcmtk (echoscu, storescu, storescp, dcmqrscp, dsrdump) for the DICOM receiver's, pull's and
# SR export's tests, and dicom3tools (dciodvfy) for the SR export's. Runs as root, or
# through sudo when it is available.
set -euo pipefail
missing=()
command -v dcmqrscp >/dev/null 2>&1 || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "test-deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  sudo="sudo -n"
fi
echo "test-deps: installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
