#!/usr/bin/env bash
# Side-by-side benchmark of threes' netboot servers against their peers, in
# one run, on one veth setup and one MAC list:
#   - DHCP: perfdhcp (kea-admin) in relay mode against threes-dhcpbench, Kea
#     (kea-dhcp4, memfile, multi-threaded) and dnsmasq, at a sweep of rates;
#     leases/s (4-way exchanges completed per second) and drops.
#   - metadata: wrk from a VM-like namespace (right MAC and IP) against the
#     metadata server with the neighbour check on and off.
# Needs root, ip, go, perfdhcp, kea-dhcp4, dnsmasq, wrk. Everything runs in
# namespaces this script creates and removes on exit, and traffic never
# leaves them.
#
# Knobs: RATES="1000 2000 ..." PERIOD=5 (s per rate) NMACS=20000
#        WRK_DURATION=10s WRK_CONNS=32 ROUNDS=3
set -euo pipefail

RATES=${RATES:-"1000 2000 4000 6000 8000 12000 16000"}
PERIOD=${PERIOD:-5}
NMACS=${NMACS:-20000}
WRK_DURATION=${WRK_DURATION:-10s}
WRK_CONNS=${WRK_CONNS:-32}
CLEAN=0.1 # a rate is "clean" when at most this % of exchanges dropped

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/threes-netboot-bench.XXXXXX)
S=threes-bsrv-$$ # the bridge and the server under test
G=threes-bgen-$$ # perfdhcp, as a relay agent on the bridge
C=threes-bcli-$$ # wrk, as a VM
PID=""

cleanup() {
	if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
	ip netns del "$S" 2>/dev/null || true
	ip netns del "$G" 2>/dev/null || true
	ip netns del "$C" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT

for t in ip go perfdhcp kea-dhcp4 dnsmasq wrk ss; do
	command -v "$t" >/dev/null || { echo "run.sh: $t not found" >&2; exit 1; }
done

(cd "$ROOT" && go build -o "$WORK/threes-dhcpbench" ./cmd/threes-dhcpbench)

# --- topology: bridge 10.10.0.1/16 in S; G and C plugged into it by veths.
for ns in "$S" "$G" "$C"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$S" link add br0 type bridge
ip -n "$S" addr add 10.10.0.1/16 dev br0
ip -n "$S" link set br0 up
plug() { # ns port mac addr
	ip -n "$S" link add "$2" type veth peer name eth0 netns "$1"
	ip -n "$S" link set "$2" master br0
	ip -n "$S" link set "$2" up
	ip -n "$1" link set eth0 address "$3"
	ip -n "$1" addr add "$4" dev eth0
	ip -n "$1" link set eth0 up
}
# The relay's address is outside every server's pool (which ends at .253).
plug "$G" vgen 02:ff:00:00:00:01 10.10.255.254/16

# --- one MAC list for everyone. The client's MAC is the list's first.
awk -v n="$NMACS" 'BEGIN { for (i = 0; i < n; i++) printf "02:00:00:%02x:%02x:%02x\n", int(i / 65536), int(i / 256) % 256, i % 256 }' >"$WORK/macs"

wait_port() { # proto port
	for _ in $(seq 100); do
		if ip netns exec "$S" ss -Hln"$1" "sport = :$2" | grep -q .; then return 0; fi
		sleep 0.1
	done
	echo "run.sh: nothing listens on $1 port $2" >&2
	exit 1
}

start() { # name, command...
	local name=$1; shift
	ip netns exec "$S" "$@" >"$WORK/$name.log" 2>&1 &
	PID=$!
}

stop() {
	kill "$PID" 2>/dev/null || true
	wait "$PID" 2>/dev/null || true
	PID=""
}

# --- DHCP sweep.
declare -A BEST CLEANRATE
printf '%-9s %8s %10s %8s %7s\n' server offered leases/s drops drop% | tee "$WORK/table"
sweep() { # name
	local name=$1 best=0 clean=0
	for r in $RATES; do
		ip netns exec "$G" perfdhcp -4 -l 10.10.255.254 -r "$r" -R "$NMACS" -M "$WORK/macs" \
			-p "$PERIOD" -W 500000 10.10.0.1 >"$WORK/perf-$name-$r" 2>&1 || true
		read -r rate sent drops < <(awk '
			/^Rate:/ { rate = $2 }
			/^sent packets:/ && !s { sent = $3; s = 1 }
			/^drops:/ { d += $2 }
			END { printf "%d %d %d\n", rate, sent, d }' "$WORK/perf-$name-$r")
		local pct
		pct=$(awk -v d="$drops" -v s="$sent" 'BEGIN { printf "%.2f", s ? 100 * d / s : 100 }')
		printf '%-9s %8d %10d %8d %7s\n' "$name" "$r" "$rate" "$drops" "$pct" | tee -a "$WORK/table"
		[ "$rate" -gt "$best" ] && best=$rate
		if awk -v p="$pct" -v c="$CLEAN" 'BEGIN { exit !(p <= c) }'; then clean=$rate; fi
	done
	BEST[$name]=$best
	CLEANRATE[$name]=$clean
}

start threes "$WORK/threes-dhcpbench" -i br0 -macs "$WORK/macs" -allocs-out "$WORK/allocs" -stats "$WORK/threes-stats.json"
wait_port u 67
sweep threes
stop
echo "threes counters: $(cat "$WORK/threes-stats.json")"

cat >"$WORK/kea.json" <<'EOF'
{"Dhcp4": {
  "interfaces-config": {"interfaces": ["br0"], "dhcp-socket-type": "udp"},
  "lease-database": {"type": "memfile", "persist": false, "lfc-interval": 0},
  "multi-threading": {"enable-multi-threading": true, "thread-pool-size": 2, "packet-queue-size": 64},
  "valid-lifetime": 3600,
  "subnet4": [{"id": 1, "subnet": "10.10.0.0/16",
    "pools": [{"pool": "10.10.0.2 - 10.10.255.253"}],
    "option-data": [{"name": "routers", "data": "10.10.0.1"},
                    {"name": "domain-name-servers", "data": "10.10.0.1"}]}],
  "loggers": [{"name": "kea-dhcp4", "output_options": [{"output": "stderr"}], "severity": "WARN"}]
}}
EOF
KEA_PIDFILE_DIR=$WORK KEA_LOCKFILE_DIR=$WORK start kea kea-dhcp4 -c "$WORK/kea.json"
wait_port u 67
sweep kea
stop

start dnsmasq dnsmasq --no-daemon --conf-file=/dev/null --port=0 --interface=br0 --bind-interfaces \
	--dhcp-range=10.10.0.2,10.10.255.253,255.255.0.0,1h --dhcp-option=option:router,10.10.0.1 \
	--dhcp-lease-max=1000000 --leasefile-ro --no-ping --dhcp-authoritative --quiet-dhcp \
	--pid-file="$WORK/dnsmasq.pid"
wait_port u 67
sweep dnsmasq
stop

# --- metadata: wrk as the list's first VM, check on and off.
read -r CMAC CIP < <(grep -m1 "^$(head -1 "$WORK/macs") " "$WORK/allocs")
plug "$C" vcli "$CMAC" "$CIP/16"
# Other load on the machine moves single runs a lot: alternate on and off
# for ROUNDS rounds and keep each side's best.
declare -A RPS=([true]=0 [false]=0)
for round in $(seq "${ROUNDS:-3}"); do
	for check in true false; do
		start "meta-$check" "$WORK/threes-dhcpbench" -i br0 -macs "$WORK/macs" -metadata 10.10.0.1:8080 -neigh="$check"
		wait_port t 8080
		# One request first, so the check's first ARP probe is not in the run.
		ip netns exec "$C" wrk -t1 -c1 -d1s http://10.10.0.1:8080/v1/hostname >/dev/null
		ip netns exec "$C" wrk -t2 -c"$WRK_CONNS" -d"$WRK_DURATION" http://10.10.0.1:8080/v1/hostname >"$WORK/wrk-$check" 2>&1
		rps=$(awk '/^Requests\/sec:/ { printf "%d", $2 }' "$WORK/wrk-$check")
		non2xx=$(awk '/Non-2xx/ { print $NF }' "$WORK/wrk-$check")
		echo "metadata round $round, neighbour check $check: $rps requests/s${non2xx:+ ($non2xx non-2xx)}"
		[ "$rps" -gt "${RPS[$check]}" ] && RPS[$check]=$rps
		stop
	done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "inf" }'; }
echo
echo "== summary (perfdhcp, $NMACS MACs, ${PERIOD}s per rate; clean = drops <= $CLEAN%)"
printf '%-9s %14s %18s\n' server max-leases/s max-clean-rate
for s in threes kea dnsmasq; do printf '%-9s %14d %18d\n' "$s" "${BEST[$s]}" "${CLEANRATE[$s]}"; done
echo "threes/kea:     max $(ratio "${BEST[threes]}" "${BEST[kea]}")x, clean $(ratio "${CLEANRATE[threes]}" "${CLEANRATE[kea]}")x"
echo "threes/dnsmasq: max $(ratio "${BEST[threes]}" "${BEST[dnsmasq]}")x, clean $(ratio "${CLEANRATE[threes]}" "${CLEANRATE[dnsmasq]}")x"
echo "metadata best of ${ROUNDS:-3}: check on ${RPS[true]}/s, off ${RPS[false]}/s"
echo "metadata check on/off: $(ratio "${RPS[true]}" "${RPS[false]}") (cost $(awk -v on="${RPS[true]}" -v off="${RPS[false]}" 'BEGIN { printf "%.1f", off ? 100 * (off - on) / off : 0 }')%)"
