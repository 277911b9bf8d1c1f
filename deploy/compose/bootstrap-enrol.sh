#!/bin/sh
# compose `enrol` job: the coordinator enrols each site's key and approved dataset root.
#   $@ site names; their requests are /enrolment/NAME.pub and /enrolment/NAME.root.
set -eu
for SITE in "$@"; do
  ROOT=$(cat "/enrolment/$SITE.root")
  if fl-server roster --config /etc/fedseal/server.toml --json | grep -q "\"$SITE\""; then
    echo "site $SITE already enrolled"
    continue
  fi
  fl-server enroll --config /etc/fedseal/server.toml --site "$SITE" \
    --key "/enrolment/$SITE.pub" --dataset-root "$ROOT"
done
fl-server roster --config /etc/fedseal/server.toml
