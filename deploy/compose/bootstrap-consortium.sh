#!/bin/sh
# compose `consortium` job: stands in for the consortium's roster authority, which is neither
# the coordinator nor a site. Runs after the site-X-init jobs.
#   $@ site names; their public keys are /enrolment/NAME.pub.
# Creates the authority key once (/consortium-keys, a volume no other service mounts: it stands
# in for the consortium's offline key) and writes the roster of the sites, signed by it, with
# the authority's public key into the `consortium` volume (roster.json, authority.key.pub),
# which every site mounts read-only and pins in client.toml [trust]. Idempotent: a site missing
# from the roster is added (a new version, re-signed); a site listed with another key, or
# revoked, is left to the operator (deploy/README.md, "Consortium roster").
set -eu
AUTH=/consortium-keys/authority.key
OUT=/consortium
ROSTER=$OUT/roster.json
NEW_AUTHORITY=0

if [ ! -f "$AUTH" ]; then
  fl-client roster authority-init --out "$AUTH"
  NEW_AUTHORITY=1
fi

if [ "$NEW_AUTHORITY" = 1 ] || [ ! -f "$ROSTER" ]; then
  # Version 1 under this authority (a roster left by a lost authority key is replaced: sites
  # keep the highest version they saw per authority key, so a new authority starts afresh).
  n=$#
  for SITE in "$@"; do
    set -- "$@" --site "$SITE=/enrolment/$SITE.pub"
  done
  shift "$n"
  fl-client roster create --authority-key "$AUTH" --consortium fedseal-compose \
    --out "$ROSTER" --force "$@"
else
  for SITE in "$@"; do
    fl-client roster show --roster "$ROSTER" --authority "$AUTH.pub" --json > /tmp/roster.json
    LISTED=$(python - "$SITE" <<'PY'
import json, sys
doc = json.load(open("/tmp/roster.json"))
entry = next((s for s in doc["sites"] if s["site"] == sys.argv[1]), None)
print("" if entry is None else f"{entry['status']} {entry['key_id']}")
PY
)
    KID=$(fedseal-pki key-id "/enrolment/$SITE.pub")
    if [ -z "$LISTED" ]; then
      fl-client roster add --roster "$ROSTER" --authority-key "$AUTH" \
        --site "$SITE" --key "/enrolment/$SITE.pub"
    elif [ "$LISTED" != "active $KID" ]; then
      echo "consortium: $SITE is in the roster as '$LISTED', its key id is $KID:" \
        "a re-keyed or revoked site is the roster authority's decision" \
        "(fl-client roster revoke / add; deploy/README.md, \"Consortium roster\")" >&2
      exit 1
    else
      echo "site $SITE already in the roster (key id $KID)"
    fi
  done
  rm -f /tmp/roster.json
fi
install -m 0644 "$AUTH.pub" "$OUT/authority.key.pub"
fl-client roster show --roster "$ROSTER" --authority "$OUT/authority.key.pub"
