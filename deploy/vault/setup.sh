#!/bin/sh
# Configure a fresh Vault or OpenBao for meshcar (see README.md next to this file):
# PKI root mount `pki`, intermediate mount `pki_int`, the role `meshcar-workloads`
# (spiffe://TD/svc/* only), a per-workload role + policy + AppRole for every --workload,
# and the AppRole `meshcar-ca` for `meshcar ca serve --backend vault`.
#
#   VAULT_ADDR=http://127.0.0.1:8200 VAULT_TOKEN=<admin token> \
#     deploy/vault/setup.sh meshcar.demo ./vault-out --workload svc/web --workload svc/api
#
# The admin token is read from $VAULT_TOKEN (or $BAO_TOKEN), never from the command line.
# Outputs in OUT_DIR (0700): vault-root.pem, NAME.role-id, NAME.secret-id (0600).
set -eu
if [ $# -lt 2 ]; then
    echo "usage: VAULT_ADDR=... VAULT_TOKEN=... $0 TRUST_DOMAIN OUT_DIR [--workload PATH ...] [--allowed-uri PATTERN ...]" >&2
    exit 2
fi
: "${VAULT_ADDR:=${BAO_ADDR:-}}"
if [ -z "$VAULT_ADDR" ]; then
    echo "$0: set VAULT_ADDR (or BAO_ADDR)" >&2
    exit 2
fi
trust_domain=$1
out=$2
shift 2
exec "${MESHCAR:-meshcar}" ca vault-setup --addr "$VAULT_ADDR" --trust-domain "$trust_domain" --out "$out" "$@"
