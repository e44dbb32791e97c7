#!/usr/bin/env bash
# Write .env for docker-compose.airflow.yml from .env.example, with fresh random secrets.
#
# Usage: bash deploy/make-env.sh [OUTPUT]        (OUTPUT defaults to .env in the repository root)
#
# Every variable left empty in .env.example is a secret: it gets a random URL-safe value
# (AIRFLOW_FERNET_KEY a Fernet key, DRIFTLOOP_API_KEYS one API key). Other values are copied as they
# are. An existing OUTPUT is never overwritten. The file is written readable by its owner only.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXAMPLE=${DRIFTLOOP_ENV_EXAMPLE:-$REPO_ROOT/.env.example}
OUTPUT=${1:-$REPO_ROOT/.env}

if [[ -e $OUTPUT ]]; then
    echo "make-env: $OUTPUT exists; remove it first to generate new secrets" >&2
    exit 1
fi
[[ -f $EXAMPLE ]] || { echo "make-env: $EXAMPLE not found" >&2; exit 1; }

# Random values from /dev/urandom with coreutils only (od, base64, tr).
random_hex() { head -c "$1" /dev/urandom | od -An -v -tx1 | tr -d ' \n'; }
random_base64url() { head -c "$1" /dev/urandom | base64 | tr -d '\n' | tr '+/' '-_'; }

secret() {
    case $1 in
        AIRFLOW_FERNET_KEY) random_base64url 32 ;;           # Fernet: 32 bytes, url-safe base64
        DRIFTLOOP_API_KEYS) random_base64url 32 | tr -d '=' ;;
        *) random_hex 24 ;;
    esac
}

umask 077
tmp=$(mktemp "$OUTPUT.XXXXXX")
trap 'rm -f "$tmp"' EXIT
generated=()
while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line =~ ^([A-Z][A-Z0-9_]*)=$ ]]; then
        name=${BASH_REMATCH[1]}
        printf '%s=%s\n' "$name" "$(secret "$name")" >>"$tmp"
        generated+=("$name")
    else
        printf '%s\n' "$line" >>"$tmp"
    fi
done <"$EXAMPLE"
mv "$tmp" "$OUTPUT"
trap - EXIT
echo "make-env: wrote $OUTPUT with new values for ${generated[*]}" >&2
