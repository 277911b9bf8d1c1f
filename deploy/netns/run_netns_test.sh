#!/usr/bin/env bash
# fedseal multi-host test in Linux network namespaces (needs root, iproute2).
#
#   run_netns_test.sh --selftest     network only: topology, TLS with SAN = coordinator address,
#                                    link cut and heal, clock-skew tool; no fedseal run
#   run_netns_test.sh                a secure run with one coordinator and four site "hosts",
#                                    with faults injected, then `fl-audit verify`
#
# Options: --workdir DIR (default: a fresh temp dir, removed unless --keep), --keep,
#          --time-limit SECONDS (default 900), --rounds N (default 4), --skew SECONDS (default -90),
#          --bin DIR (where fl-server, fl-client, fl-audit live; default: next to $PYTHON),
#          --inject-failure (fail on purpose right after the namespaces exist, to test the cleanup)
# Environment: PYTHON (default: python3 on PATH), FEDSEAL_NETNS_PREFIX (namespace name prefix,
#              default "fsn<pid>").
#
# Topology (all of it inside namespaces this script creates; nothing is added to the host's
# own namespace, and every address is one this script assigns in 10.231.0.0/24):
#
#     <p>-coord 10.231.0.1 --veth--+
#     <p>-s1    10.231.0.11 --veth-+-- br0 in <p>-sw
#     <p>-s2    10.231.0.12 --veth-+
#     <p>-s3    10.231.0.13 --veth-+
#     <p>-s4    10.231.0.14 --veth-+
#    (<p>-s5    10.231.0.15 --veth-+   only with a --skew outside Flower's window, see below)
#
# The server certificate's SANs: the coordinator's address (what sites check) and 127.0.0.1
# (fl-server's own loopback SuperLink is served with the same certificate).
# A "link cut" sets the site's port on the bridge down; healing sets it up again.
# Every site runs with the product's defaults and no opt-out: [privacy] is left out of its
# client.toml (plain training refused, cohorts of at least 3 sites with at least 2 other known
# sites, a survivor quorum of floor((n + floor(n/3))/2) + 1), and it trusts only the sites of the
# consortium roster, signed by the consortium's roster authority (`fl-client roster`; a key
# neither the coordinator nor any site holds) and pinned in client.toml [trust]. Four sites: a cut
# site must be survivable: a 4-site cohort keeps its quorum of 3 with one site gone (a 3-site
# cohort needs all 3).
# Faults in the full run: site 2's link is cut during round 2 (a dropout) and healed after it;
# site 1 is partitioned for a few seconds (healed well before the stage timeout); site 3 runs with
# its wall clock skewed by --skew seconds (deploy/netns/clock_skew/sitecustomize.py: libfaketime
# breaks CPython's timed waits, see that file).
# Flower's SuperLink accepts a SuperNode's signed timestamp from 300 s in its past to 5 s in its
# future: with a skew in that window site 3 must take part in a round with all four sites; with
# a skew outside it site 3 is refused and the run must still finish without it (a fifth site then
# joins, so that the round with site 2 cut still keeps a quorum of 3 out of 4);
# the coordinator is SIGKILLed after round 3 and restarted with --resume. The run must finish and
# `fl-audit verify` must pass on its audit log.
#
# Every namespace created is deleted on exit (success, failure, signal, or time limit), after the
# processes started inside them are ended. Output: one line per check, "netns: PASS name" or
# "netns: FAIL name: why", then "netns summary: ok=N failed=M skipped=K". Exit 0 iff failed=0;
# 2 for usage errors; 3 if the environment cannot run it (not root, no netns support).
set -euo pipefail

SELFTEST=0 KEEP=0 LIMIT=900 ROUNDS=4 SKEW=-90 INJECT=0 WORKDIR="" BIN=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --selftest) SELFTEST=1; shift ;;
    --keep) KEEP=1; shift ;;
    --inject-failure) INJECT=1; shift ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --time-limit) LIMIT=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --skew) SKEW=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    -h|--help) sed -n '2,50p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage error: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ $LIMIT =~ ^[0-9]+$ && $ROUNDS =~ ^[0-9]+$ && $SKEW =~ ^-?[0-9]+$ ]] || { echo "usage error: numbers expected" >&2; exit 2; }
(( ROUNDS >= 4 || SELFTEST == 1 )) || { echo "usage error: --rounds must be >= 4 (faults are scheduled in rounds 1-3)" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
DEPLOY=$(dirname "$HERE")
PYTHON=${PYTHON:-$(command -v python3)}
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
BIN=${BIN:-$(dirname "$PYTHON")}
PREFIX=${FEDSEAL_NETNS_PREFIX:-fsn$$}
SW="$PREFIX-sw"
COORD="$PREFIX-coord"
COORD_IP=10.231.0.1
FLEET_PORT=9092
SKEW_DIR="$DEPLOY/netns/clock_skew"
clock_skew_tool() { [[ -f $SKEW_DIR/sitecustomize.py ]]; }
skew_accepted() { (( SKEW > -300 && SKEW < 5 )); }
# Four site hosts; a fifth stands in for site 3 when its skewed clock gets it refused.
NSITES=4
if [[ $SELFTEST == 0 ]] && clock_skew_tool && ! skew_accepted; then NSITES=5; fi
SITES=() SITE_IPS=()
for ((i = 1; i <= NSITES; i++)); do
  SITES+=("$PREFIX-s$i")
  SITE_IPS+=("10.231.0.$((10 + i))")
done

OK=0 FAILED=0 SKIPPED=0
pass() { OK=$((OK + 1)); echo "netns: PASS $1"; }
fail() { FAILED=$((FAILED + 1)); echo "netns: FAIL $1: $2"; }
skip() { SKIPPED=$((SKIPPED + 1)); echo "netns: SKIP $1: $2"; }
log() { echo "netns: $*" >&2; }

[[ $(id -u) == 0 ]] || { echo "netns: cannot run: needs root (network namespaces)" >&2; exit 3; }
command -v ip >/dev/null || { echo "netns: cannot run: ip (iproute2) not installed" >&2; exit 3; }

CREATED=()
PIDS=()
WATCHDOG=""
OWN_WORKDIR=0

cleanup() {
  local rc=$? ns pid
  trap - EXIT INT TERM
  [[ -n $WATCHDOG ]] && kill "$WATCHDOG" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  # Processes still inside our namespaces were started by this script (or by its children).
  for ns in "${CREATED[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  for ns in "${CREATED[@]}"; do ip netns del "$ns" 2>/dev/null || log "could not delete namespace $ns"; done
  if [[ $OWN_WORKDIR == 1 && $KEEP == 0 && -n $WORKDIR ]]; then rm -rf "$WORKDIR"; fi
  [[ $KEEP == 1 && -n $WORKDIR ]] && log "kept $WORKDIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted or out of time"; exit 124' INT TERM

# The watchdog: its sleep is ended with it (a stray sleep would hold our stdout open).
(
  trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
  sleep "$LIMIT" &
  sleep_pid=$!
  wait "$sleep_pid"
  log "time limit of ${LIMIT}s reached"
  kill -TERM $$ 2>/dev/null
) &
WATCHDOG=$!

if [[ -z $WORKDIR ]]; then WORKDIR=$(mktemp -d /tmp/fedseal-netns.XXXXXX); OWN_WORKDIR=1; fi
mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

add_ns() {
  ip netns add "$1" || { echo "netns: cannot run: 'ip netns add' failed (no CAP_SYS_ADMIN?)" >&2; exit 3; }
  CREATED+=("$1")
  ip -n "$1" link set lo up
}

# $1 namespace, $2 port name on the bridge, $3 address
attach() {
  ip -n "$1" link add eth0 type veth peer name "$2" netns "$SW"
  ip -n "$SW" link set "$2" master br0 up
  ip -n "$1" addr add "$3/24" dev eth0
  ip -n "$1" link set eth0 up
}

link_cut() { ip -n "$SW" link set "$1" down; }
link_heal() { ip -n "$SW" link set "$1" up; }

build_topology() {
  add_ns "$SW"
  ip -n "$SW" link add br0 type bridge
  ip -n "$SW" link set br0 up
  add_ns "$COORD"
  attach "$COORD" coord "$COORD_IP"
  local i
  for ((i = 0; i < NSITES; i++)); do
    add_ns "${SITES[$i]}"
    attach "${SITES[$i]}" "s$((i + 1))" "${SITE_IPS[$i]}"
  done
}

# TLS probe from a namespace to the coordinator (the container health check, pinned CA).
probe() { # $1 namespace, [$2 server name]
  in_ns "$1" env FEDSEAL_SUPERLINK="$COORD_IP:$FLEET_PORT" FEDSEAL_CA="$WORKDIR/pki/ca/ca.pem" \
    FEDSEAL_TLS_SERVER_NAME="${2:-$COORD_IP}" FEDSEAL_HEALTH_TIMEOUT=2 \
    "$PYTHON" "$DEPLOY/docker/healthcheck.py" site >/dev/null 2>&1
}

wait_for() { # $1 seconds, $2... command; polls every 0.5 s
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    (( SECONDS < deadline )) || return 1
    sleep 0.5
  done
}

make_pki() {
  bash "$DEPLOY/pki/fedseal-pki" ca-init --ca "$WORKDIR/pki/ca" --name "fedseal netns CA" >/dev/null
  bash "$DEPLOY/pki/fedseal-pki" server-cert --ca "$WORKDIR/pki/ca" --out "$WORKDIR/pki/server" \
    --san "ip:$COORD_IP" --san ip:127.0.0.1 >/dev/null
}

skew_env() { echo "env PYTHONPATH=$SKEW_DIR FEDSEAL_CLOCK_SKEW_S=$SKEW"; }

# ---------------------------------------------------------------------------------------------
selftest() {
  local i tls_pid
  make_pki
  # A TLS listener on the coordinator's Fleet address, serving the fedseal-pki certificate.
  ip netns exec "$COORD" "$PYTHON" - "$WORKDIR/pki/server" "$COORD_IP" "$FLEET_PORT" <<'EOF' &
import socket, ssl, sys
d, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(f"{d}/server-chain.pem", f"{d}/server.key")
srv = socket.create_server((host, port))
while True:
    conn, _ = srv.accept()
    conn.settimeout(5)
    try:
        with ctx.wrap_socket(conn, server_side=True):
            pass
    except (ssl.SSLError, OSError):
        pass
EOF
  tls_pid=$!
  PIDS+=("$tls_pid")
  if wait_for 20 probe "${SITES[0]}"; then pass "listener-up"; else fail "listener-up" "no TLS listener on $COORD_IP:$FLEET_PORT"; return; fi
  for ((i = 0; i < NSITES; i++)); do
    if probe "${SITES[$i]}"; then pass "tls-pinned-ca-san-${SITES[$i]#"$PREFIX"-}"; else fail "tls-pinned-ca-san-${SITES[$i]#"$PREFIX"-}" "handshake failed"; fi
  done
  if probe "${SITES[0]}" 10.231.0.2; then fail "tls-wrong-name-refused" "a name outside the SAN was accepted"; else pass "tls-wrong-name-refused"; fi
  link_cut s2
  if probe "${SITES[1]}"; then fail "link-cut" "site 2 still reaches the coordinator"; else pass "link-cut"; fi
  if probe "${SITES[0]}"; then pass "link-cut-isolated-to-one-site"; else fail "link-cut-isolated-to-one-site" "site 1 lost its link too"; fi
  link_heal s2
  if wait_for 10 probe "${SITES[1]}"; then pass "link-heal"; else fail "link-heal" "site 2 did not come back"; fi
  if clock_skew_tool; then
    local real fake
    real=$(date +%s)
    # shellcheck disable=SC2046
    fake=$(in_ns "${SITES[2]}" $(skew_env) "$PYTHON" -c 'import time; print(int(time.time()))')
    if (( fake - real >= SKEW - 5 && fake - real <= SKEW + 5 )); then pass "clock-skew-tool"; else fail "clock-skew-tool" "the skew shim gave $((fake - real))s, wanted ${SKEW}s"; fi
  else
    skip "clock-skew-tool" "$SKEW_DIR/sitecustomize.py missing"
  fi
}

# ---------------------------------------------------------------------------------------------
ROUND_RE='^round ([0-9]+): ([a-z]+)'
round_seen() { grep -Eq "^round $1: " "$WORKDIR"/coord-*.log 2>/dev/null; }

fleet_port_free() { [[ -z $(in_ns "$COORD" ss -ltnH "sport = :$FLEET_PORT") ]]; }

start_coordinator() { # $1 attempt number, $2 extra args
  local logf="$WORKDIR/coord-$1.log"
  # shellcheck disable=SC2086
  # `ip netns exec` and env exec, so $! is fl-server itself (SIGKILL below hits the coordinator).
  ip netns exec "$COORD" env COLUMNS=200 "$BIN/fl-server" run --config "$WORKDIR/coord/server.toml" $2 >"$logf" 2>&1 &
  COORD_PID=$!
  PIDS+=("$COORD_PID")
}

start_site() { # $1 index, $2 optional prefix command (the clock-skew env)
  local name="site-$(( $1 + 1 ))" prefix=()
  [[ -n ${2:-} ]] && read -r -a prefix <<<"$2"
  ip netns exec "${SITES[$1]}" env COLUMNS=200 "${prefix[@]}" "$BIN/fl-client" run \
    --config "$WORKDIR/sites/$name/client.toml" >"$WORKDIR/$name.log" 2>&1 &
  PIDS+=("$!")
}

fullrun() {
  local i name root roots rc others
  local -a members=()
  for tool in fl-server fl-client fl-audit; do
    [[ -x $BIN/$tool ]] || { fail "setup" "$BIN/$tool not found"; return; }
  done
  make_pki
  # Data and keys, as each site would prepare them.
  "$BIN/fl-client" data split mnist-5k "$WORKDIR/data" --sites "$NSITES" --seed 1 --json >"$WORKDIR/split.json"
  mapfile -t roots < <("$PYTHON" -c 'import json,sys; [print(s["root"]) for s in json.load(open(sys.argv[1]))["sites"]]' "$WORKDIR/split.json")
  mkdir -p "$WORKDIR/coord/state" "$WORKDIR/consortium"
  "$BIN/fl-server" init "$WORKDIR/coord-init" --san "$COORD_IP" >/dev/null 2>&1
  install -m 0600 "$WORKDIR/coord-init/coordinator.key" "$WORKDIR/coord/coordinator.key"
  install -m 0644 "$WORKDIR/coord-init/coordinator.pub" "$WORKDIR/coord/coordinator.pub"
  cat >"$WORKDIR/coord/server.toml" <<EOF
[coordinator]
key = "$WORKDIR/coord/coordinator.key"
state_dir = "$WORKDIR/coord/state"
roster = "$WORKDIR/coord/roster.json"

[tls]
ca_cert = "$WORKDIR/pki/ca/ca.pem"
server_cert = "$WORKDIR/pki/server/server.pem"
server_key = "$WORKDIR/pki/server/server.key"

[network]
fleet_host = "0.0.0.0"
fleet_port = $FLEET_PORT
internal_port = 9091
metrics_port = 9464

[run]
rounds = $ROUNDS
model = "mlp"
min_sites = 3
epochs = 1
batch_size = 64
stage_timeout_s = 40.0
sites_wait_timeout_s = 90.0
# Every round starts with a setup exchange of its own, so fault 1 (a site cut right after round 1)
# lands in round 2's key exchange or just after it: the 4-site cohort either restarts the key
# exchange with the 3 sites left (a 3-site cohort: the sites' default min_cohort) or keeps its
# quorum of 3 with one dropout. The default (the setup riding on the last round's evaluation) is
# tested on loopback (tests/e2e).
setup_with_evaluation = false
EOF
  for ((i = 0; i < NSITES; i++)); do
    name="site-$((i + 1))"
    root=${roots[$i]}
    mkdir -p "$WORKDIR/sites/$name/state" "$WORKDIR/sites/$name/trust"
    "$BIN/fl-client" keys init --out "$WORKDIR/sites/$name/site.key" >/dev/null 2>&1
    "$BIN/fl-server" enroll --config "$WORKDIR/coord/server.toml" --site "$name" \
      --key "$WORKDIR/sites/$name/site.key.pub" --dataset-root "$root" >/dev/null 2>&1
    members+=(--site "$name=$WORKDIR/sites/$name/site.key.pub")
  done
  # The consortium's roster authority (neither the coordinator nor a site) signs the roster of
  # the sites' keys; every site gets its own copy of the roster and of the authority's public
  # key, as the consortium would hand them out.
  if ! { "$BIN/fl-client" roster authority-init --out "$WORKDIR/consortium/authority.key" &&
         "$BIN/fl-client" roster create --authority-key "$WORKDIR/consortium/authority.key" \
           --consortium fedseal-netns --out "$WORKDIR/consortium/roster.json" "${members[@]}"; } \
       >"$WORKDIR/consortium.log" 2>&1; then
    fail "setup" "could not create the consortium roster: $(tail -1 "$WORKDIR/consortium.log")"
    return
  fi
  for ((i = 0; i < NSITES; i++)); do
    name="site-$((i + 1))"
    root=${roots[$i]}
    install -m 0644 "$WORKDIR/consortium/roster.json" "$WORKDIR/consortium/authority.key.pub" \
      "$WORKDIR/sites/$name/trust/"
    cat >"$WORKDIR/sites/$name/client.toml" <<EOF
[site]
name = "$name"
key = "$WORKDIR/sites/$name/site.key"
state_dir = "$WORKDIR/sites/$name/state"

[coordinator]
superlink = "$COORD_IP:$FLEET_PORT"
ca_cert = "$WORKDIR/pki/ca/ca.pem"
public_key = "$WORKDIR/coord/coordinator.pub"

[data]
dataset_dir = "$WORKDIR/data/site-$i"
approved_root = "$root"

# No [privacy] and no [limits]: the product's defaults, with no opt-out.
[trust]
roster = "$WORKDIR/sites/$name/trust/roster.json"
roster_authority = "$WORKDIR/sites/$name/trust/authority.key.pub"
EOF
  done
  pass "setup"
  # Each site's effective policy: the defaults, and every other site known from the roster.
  others=0
  for ((i = 0; i < NSITES; i++)); do
    name="site-$((i + 1))"
    if "$BIN/fl-client" policy show --config "$WORKDIR/sites/$name/client.toml" >"$WORKDIR/policy-$name.log" 2>&1 &&
       grep -q "known peers ($((NSITES - 1))): .*(roster)" "$WORKDIR/policy-$name.log" &&
       grep -q "plain training: refused" "$WORKDIR/policy-$name.log" &&
       grep -q "cohort >= 3 sites with >= 2 other known sites" "$WORKDIR/policy-$name.log"; then
      others=$((others + 1))
    else
      log "$name's policy: $(tr '\n' ' ' <"$WORKDIR/policy-$name.log")"
    fi
  done
  if (( others == NSITES )); then
    pass "sites-trust-the-consortium-roster"
  else
    fail "sites-trust-the-consortium-roster" "$((NSITES - others)) site(s) without the default policy and $((NSITES - 1)) roster peers (see policy-*.log)"
    return
  fi

  start_coordinator 1 ""
  if wait_for 120 probe "${SITES[0]}"; then pass "coordinator-reachable-over-tls"; else fail "coordinator-reachable-over-tls" "no TLS on $COORD_IP:$FLEET_PORT (see coord-1.log)"; return; fi
  start_site 0
  start_site 1
  if clock_skew_tool; then
    # Only the wall clock is skewed, as on a host whose NTP is off.
    start_site 2 "$(skew_env)"
    log "site-3 runs with its clock skewed by ${SKEW}s"
  else
    start_site 2
    skip "clock-skew" "$SKEW_DIR/sitecustomize.py missing"
  fi
  for ((i = 3; i < NSITES; i++)); do start_site "$i"; done

  # Fault 1: cut site 2's link once round 1 is done, i.e. during round 2; heal after round 2.
  # The other three keep the quorum of 3 (of a 4-site cohort), or form a 3-site cohort of their
  # own when the key exchange restarts without site 2.
  if wait_for 420 round_seen 1; then pass "round-1-done"; else fail "round-1-done" "no round result (see coord-1.log)"; return; fi
  link_cut s2
  log "cut site-2's link during round 2"
  if wait_for 180 round_seen 2; then pass "round-2-done-with-site-2-cut"; else fail "round-2-done-with-site-2-cut" "round 2 did not end"; return; fi
  link_heal s2
  # Fault 2: a short partition of site 1, healed long before the 40 s stage timeout.
  link_cut s1
  sleep 5
  link_heal s1
  log "partitioned site-1 for 5 s"
  if wait_for 180 round_seen 3; then pass "round-3-done-after-healed-partition"; else fail "round-3-done-after-healed-partition" "round 3 did not end"; return; fi
  # Fault 3: the coordinator is killed and restarted with --resume.
  kill -KILL "$COORD_PID" 2>/dev/null || true
  wait "$COORD_PID" 2>/dev/null || true
  if [[ $(ps -o comm= -p "$COORD_PID" 2>/dev/null) == "" ]]; then pass "coordinator-sigkilled"; else fail "coordinator-sigkilled" "pid $COORD_PID survived SIGKILL"; fi
  log "SIGKILLed the coordinator after round 3; restarting with --resume"
  # A restarted coordinator needs the Fleet port back; name whatever still holds it.
  if ! wait_for 30 fleet_port_free; then
    log "port $FLEET_PORT still bound 30 s after the SIGKILL: $(in_ns "$COORD" ss -ltnpH "sport = :$FLEET_PORT" | tr -s ' ')"
  fi
  start_coordinator 2 "--resume"
  rc=0
  wait "$COORD_PID" || rc=$?
  if [[ $rc == 0 ]]; then pass "resumed-run-finished"; else fail "resumed-run-finished" "fl-server run --resume exited $rc (see coord-2.log)"; fi
  local committed
  committed=$(grep -Eh "$ROUND_RE" "$WORKDIR"/coord-*.log | grep -c "committed" || true)
  if (( committed >= ROUNDS - 1 )); then pass "rounds-committed($committed)"; else fail "rounds-committed" "only $committed committed rounds"; fi
  if clock_skew_tool; then
    local full_rounds
    full_rounds=$(grep -Eh "$ROUND_RE" "$WORKDIR"/coord-*.log | grep -c "committed  sites $NSITES/$NSITES" || true)
    if skew_accepted; then
      if (( full_rounds > 0 )); then pass "clock-skewed-site-took-part"; else fail "clock-skewed-site-took-part" "site 3 (clock ${SKEW}s off, inside Flower's window) never joined a committed round of all $NSITES sites"; fi
    else
      if (( full_rounds == 0 )); then pass "clock-skewed-site-refused"; else fail "clock-skewed-site-refused" "site 3 (clock ${SKEW}s off, outside Flower's window) took part"; fi
    fi
  fi
  # Every run ends with fl-audit verify.
  local auditlog
  auditlog=$(find "$WORKDIR/coord/state" -maxdepth 2 -type f -name 'audit*' ! -name '*-wal' ! -name '*-shm' -print -quit)
  if [[ -z $auditlog ]]; then
    fail "audit-verify" "fl-server wrote no audit log (audit*) under $WORKDIR/coord/state"
  elif "$BIN/fl-audit" verify "$auditlog" --coordinator-key "$WORKDIR/coord/coordinator.pub" >"$WORKDIR/audit.log" 2>&1; then
    pass "audit-verify"
  else
    fail "audit-verify" "fl-audit verify failed: $(tail -1 "$WORKDIR/audit.log")"
  fi
}

build_topology
pass "topology"
if [[ $INJECT == 1 ]]; then
  # An unexpected command failure right after the namespaces exist: set -e ends the script and
  # the EXIT trap must still remove everything.
  echo "netns: FAIL injected-failure: a command fails on purpose (--inject-failure)"
  false
fi
if [[ $SELFTEST == 1 ]]; then selftest; else fullrun; fi
echo "netns summary: ok=$OK failed=$FAILED skipped=$SKIPPED"
if [[ $FAILED != 0 ]]; then
  # The logs' tails go with the verdict: a CI run keeps nothing but this output.
  for f in "$WORKDIR"/*.log "$WORKDIR"/coord/state/serverapp.log "$WORKDIR"/sites/*/state/supernode.log; do
    [[ -f $f ]] && { echo "--- tail of ${f#"$WORKDIR"/}"; tail -n 40 "$f"; }
  done
fi
[[ $FAILED == 0 ]]
