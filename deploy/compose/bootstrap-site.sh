#!/bin/sh
# compose `site-X-init` job: what a partner site does once, before joining.
#   $1 site name, $2 index of this site's share of the bundled MNIST-5k split.
# Writes the site key, the site's dataset (attested), client.toml, and an enrolment request
# (public key + dataset root) into the shared `enrolment` volume. Idempotent.
# client.toml pins the consortium roster and its authority's public key ([trust]); the
# `consortium` job writes both (after this job) into the volume the site mounts read-only at
# /etc/fedseal/consortium. The [privacy] defaults apply (no plain training; cohorts >= 3).
set -eu
SITE=$1
INDEX=$2
KEYS=/etc/fedseal/keys
STATE=/var/lib/fedseal

install -m 0644 /ca/ca.pem "$KEYS/ca.pem"
install -m 0644 /ca/coordinator.pub "$KEYS/coordinator.pub"
if [ ! -f "$KEYS/site.key" ]; then
  fl-client keys init --out "$KEYS/site.key"
fi
if [ ! -f /data/fedseal-manifest.json ]; then
  # Every site splits the same bundled data with the same seed and keeps only its own share.
  fl-client data split mnist-5k /tmp/split --sites 3 --scheme iid --seed 7
  cp -R "/tmp/split/site-$INDEX/." /data/
  rm -rf /tmp/split
fi
fl-client attest /data --json --cache-dir "$STATE/attest-cache" > "$STATE/attestation.json"
ROOT=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["root"])' "$STATE/attestation.json")
cat > "$STATE/client.toml" <<TOML
# fedseal partner site configuration (written by deploy/compose/bootstrap-site.sh)
[site]
name = "$SITE"
key = "$KEYS/site.key"
state_dir = "$STATE"

[coordinator]
superlink = "coordinator:9092"
ca_cert = "$KEYS/ca.pem"
public_key = "$KEYS/coordinator.pub"
audit_address = "coordinator:9095"

[data]
dataset_dir = "/data"
approved_root = "$ROOT"

[trust]
# Peers this site accepts: the consortium's roster, verified under the pinned authority key.
roster = "/etc/fedseal/consortium/roster.json"
roster_authority = "/etc/fedseal/consortium/authority.key.pub"
TOML
install -m 0644 "$KEYS/site.key.pub" "/enrolment/$SITE.pub"
echo "$ROOT" > "/enrolment/$SITE.root"
echo "site $SITE: dataset root $ROOT, key id $(fedseal-pki key-id "$KEYS/site.key.pub")"
