#!/bin/sh
# compose `pki` job: the coordinator's identity key, a private CA and the server certificate
# (SANs: coordinator, localhost, 127.0.0.1) in named volumes; the CA certificate and the
# coordinator's public key go to the `ca-public` volume for the sites to pin. Idempotent.
# Demo only in one respect: the CA key stays in the coordinator-state volume; in a real
# deployment it lives offline (deploy/README.md, "PKI").
set -eu
KEYS=/etc/fedseal/keys
CA=/var/lib/fedseal/ca

if [ ! -f "$KEYS/coordinator.key" ]; then
  # fl-server init writes the coordinator key (and a demo PKI, which is not used here).
  fl-server init /tmp/init --san coordinator
  install -m 0600 /tmp/init/coordinator.key "$KEYS/coordinator.key"
  install -m 0644 /tmp/init/coordinator.pub "$KEYS/coordinator.pub"
  rm -rf /tmp/init
fi
if [ ! -f "$CA/ca.pem" ]; then
  fedseal-pki ca-init --ca "$CA" --name "fedseal compose CA"
fi
if [ ! -f "$KEYS/server.pem" ]; then
  fedseal-pki server-cert --ca "$CA" --out /tmp/server \
    --san dns:coordinator --san dns:localhost --san ip:127.0.0.1
  install -m 0600 /tmp/server/server.key "$KEYS/server.key"
  install -m 0644 /tmp/server/server.pem "$KEYS/server.pem"
  rm -rf /tmp/server
fi
install -m 0644 "$CA/ca.pem" "$KEYS/ca.pem"
install -m 0644 "$CA/ca.pem" /ca/ca.pem
install -m 0644 "$KEYS/coordinator.pub" /ca/coordinator.pub
fedseal-pki check --ca "$CA" --cert "$KEYS/server.pem" --san coordinator
