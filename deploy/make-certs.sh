#!/usr/bin/env bash
# Certificates for the compose federation (deploy/compose.yaml): a study CA, a coordinator
# reachable as `coordinator`, three nodes, their admins and a researcher, under ./pki.
# Development only: a real study keeps its CA key offline (see certs/README.md).
set -euo pipefail
cd "$(dirname "$0")"
CXRFED=${CXRFED:-cxrfed}
$CXRFED certs init --out pki/ca --study compose-study
$CXRFED certs issue --ca pki/ca --role coordinator --name coordinator --host coordinator --out pki/coordinator
for site in site-a site-b site-c; do
    $CXRFED certs issue --ca pki/ca --role node --name "node-$site" --site "$site" --host "$site" --out "pki/$site"
    $CXRFED certs issue --ca pki/ca --role admin --name "admin-$site" --site "$site" --out "pki/admin-$site"
done
$CXRFED certs issue --ca pki/ca --role researcher --name rita --out pki/rita
# The containers run as uid 10001: give it the private keys.
chmod 0600 pki/*/key.pem
