#!/bin/sh
# guest-init.sh: /init (PID 1, busybox ash) of the soft-RoCE guest that
# run-in-qemu.sh builds. It loads the rxe modules, puts rxe0 on a dummy netdev,
# optionally runs perftest, runs each test binary with QUIVER_RDMA_DEVICE and
# QUIVER_RDMA_GID_INDEX set, prints one SOFTROCE-TEST line per test and a final
# SOFTROCE-RESULT line, and powers the guest off. It must never exit: PID 1
# exiting panics the kernel, and the host would see no result.
#
# Inputs, written by run-in-qemu.sh:
#   /etc/quiver/modules      kernel modules to insmod, dependencies first
#   /etc/quiver/run.conf     PERFTEST_SIZE, _ITERS, _ARGS, TEST_TIMEOUT_S, exports
#   /opt/quiver/tests/NNN/   one directory per test: bin (symlink), name, args
#                            (one argument per line)

export PATH=/usr/sbin:/usr/bin HOME=/root
# Debian's busybox-static prefers its own applets even over files in PATH, and
# its `ip` lacks much of iproute2: call iproute2's by full path.
IP=/usr/sbin/ip
DEV=rxe0
NETDEV=dummy0
ADDR=192.0.2.1/24         # RFC 5737 TEST-NET-1; exists only inside this guest
PERFTEST_PORT=18515
PORT_ACTIVE_WAIT_S=20     # rxe's port goes ACTIVE within a second once its netdev is up
GID_WAIT_S=10             # the IPv4-mapped GID appears once the address is bound

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
exec </dev/null >/dev/console 2>&1
echo /sbin/modprobe >/proc/sys/kernel/modprobe
# shellcheck disable=SC3045 # busybox ash has ulimit -l
ulimit -l unlimited       # ibv_reg_mr pins memory
export RUST_BACKTRACE=1

PERFTEST_SIZE=''
PERFTEST_ITERS=10000
PERFTEST_ARGS=''
TEST_TIMEOUT_S=600
# shellcheck source=/dev/null
. /etc/quiver/run.conf

uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "SOFTROCE: $*"; }

FAILED=0
finish() {
    say "kernel messages about rdma, and any warnings:"
    dmesg | grep -E -e 'WARNING|BUG|Oops|Call Trace' -e '[Rr][Dd][Mm][Aa]|rxe|infiniband|ib_core|uverbs' \
        | head -n 100 | sed 's/^/    | /'
    say "done at uptime $(uptime_s)s"
    if [ "$FAILED" = 0 ]; then echo "SOFTROCE-RESULT: PASS"; else echo "SOFTROCE-RESULT: FAIL"; fi
    poweroff -f
    sleep 3600            # not reached; PID 1 must not return
}
setup_failed() {
    echo "SOFTROCE-TEST setup: FAIL ($*)"
    FAILED=1
    finish
}
# report NAME RC SECONDS: the per-test verdict line.
report() {
    if [ "$2" = 0 ]; then verdict=PASS; else verdict=FAIL; FAILED=1; fi
    say "$1 took $3 s"
    echo "SOFTROCE-TEST $1: $verdict (exit $2)"
}

say "guest up at uptime $(uptime_s)s: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPU(s)"

# ---- modules ----------------------------------------------------------------------
while read -r ko; do
    [ -n "$ko" ] || continue
    insmod "/lib/modules/$(uname -r)/$ko" || setup_failed "insmod $ko"
done </etc/quiver/modules
say "modules loaded: $(sed 's|.*/||; s|\.ko$||' /etc/quiver/modules | tr '\n' ' ')"

# ---- rxe0 on a dummy netdev ------------------------------------------------------------
$IP link set lo up || setup_failed "ip link set lo up"
# The dummy module makes dummy0 itself (numdummies=1); add it only if not.
$IP link show "$NETDEV" >/dev/null 2>&1 || $IP link add "$NETDEV" type dummy \
    || setup_failed "ip link add $NETDEV type dummy"
$IP addr add "$ADDR" dev "$NETDEV" || setup_failed "ip addr add $ADDR dev $NETDEV"
$IP link set "$NETDEV" up || setup_failed "ip link set $NETDEV up"
rdma link add "$DEV" type rxe netdev "$NETDEV" || setup_failed "rdma link add $DEV type rxe netdev $NETDEV"

PORT=/sys/class/infiniband/$DEV/ports/1
i=0
until grep -q ACTIVE "$PORT/state" 2>/dev/null; do
    i=$((i + 1))
    [ $i -le $((PORT_ACTIVE_WAIT_S * 10)) ] \
        || setup_failed "$DEV port 1 not ACTIVE after ${PORT_ACTIVE_WAIT_S}s (state: $(cat "$PORT/state" 2>&1))"
    sleep 0.1
done

# The RoCE v2 GID that maps the netdev's IPv4 address (::ffff:192.0.2.1); rxe
# puts it at index 1, after the link-local one, but look rather than assume.
# The table has hundreds of entries and a fork costs milliseconds under TCG, so
# one grep lists the used ones as "INDEX GID" lines.
used_gids() {
    grep -H -v '^0000:0000:0000:0000:0000:0000:0000:0000$' "$PORT"/gids/* 2>/dev/null \
        | sed 's|^.*/gids/\([0-9]*\):|\1 |' | sort -n
}
find_gid() {
    used_gids | while read -r n gid; do
        case $gid in 0000:0000:0000:0000:0000:ffff:*) ;; *) continue ;; esac
        [ "$(cat "$PORT/gid_attrs/types/$n" 2>/dev/null)" = "RoCE v2" ] && { echo "$n"; break; }
    done
}
i=0
GID_INDEX=$(find_gid)
while [ -z "$GID_INDEX" ]; do
    i=$((i + 1))
    [ $i -le $((GID_WAIT_S * 10)) ] || setup_failed "no IPv4-mapped RoCE v2 GID on $DEV after ${GID_WAIT_S}s"
    sleep 0.1
    GID_INDEX=$(find_gid)
done

say "$DEV port ACTIVE, GID index $GID_INDEX, at uptime $(uptime_s)s"
rdma link show "$DEV/1"
ibv_devinfo -d "$DEV" || setup_failed "ibv_devinfo -d $DEV"
say "GID table of $DEV port 1 (used entries):"
used_gids | while read -r n gid; do
    echo "    [$n] $gid $(cat "$PORT/gid_attrs/types/$n" 2>/dev/null)"
done
export QUIVER_RDMA_DEVICE="$DEV" QUIVER_RDMA_GID_INDEX="$GID_INDEX"
say "$DEV ready at uptime $(uptime_s)s: QUIVER_RDMA_DEVICE=$DEV QUIVER_RDMA_GID_INDEX=$GID_INDEX"

# ---- perftest ----------------------------------------------------------------------------
# Server and client on rxe0 in two processes; their out-of-band exchange uses
# loopback TCP. Under emulation the latencies are only comparable with other
# figures from the same run, never with real hardware.
perftest() {
    tool=$1
    start=$(uptime_s)
    # PERFTEST_ARGS (QUIVER_SOFTROCE_PERFTEST_ARGS) is split on blanks on purpose.
    # shellcheck disable=SC2086
    set -- -d "$DEV" -x "$GID_INDEX" -s "$PERFTEST_SIZE" -n "$PERFTEST_ITERS" -p "$PERFTEST_PORT" -F $PERFTEST_ARGS
    say "perftest: $tool $*"
    timeout "$TEST_TIMEOUT_S" "$tool" "$@" >"/tmp/$tool.server" 2>&1 &
    server=$!
    i=0
    # Wait (at most 10 s) for the server's TCP port, or for the server to die.
    while [ $i -lt 100 ] && kill -0 "$server" 2>/dev/null \
        && ! netstat -ltn 2>/dev/null | grep -q ":$PERFTEST_PORT "; do
        i=$((i + 1))
        sleep 0.1
    done
    timeout "$TEST_TIMEOUT_S" "$tool" "$@" 127.0.0.1 >"/tmp/$tool.client" 2>&1
    client_rc=$?
    wait "$server"
    server_rc=$?
    sed "s/^/$tool server| /" "/tmp/$tool.server"
    sed "s/^/$tool client| /" "/tmp/$tool.client"
    rc=$client_rc
    [ "$rc" != 0 ] || rc=$server_rc
    report "perftest/$tool" "$rc" "$(since "$start")"
}
if [ -n "$PERFTEST_SIZE" ]; then
    perftest ib_send_lat
    perftest ib_write_lat
fi

# ---- the test binaries ---------------------------------------------------------------------
run_test() {
    dir=$1
    name=$(cat "$dir/name")
    bin=$(readlink "$dir/bin")
    set --
    while IFS= read -r arg; do set -- "$@" "$arg"; done <"$dir/args"
    work=/tmp/work/${dir##*/}
    mkdir -p "$work"
    echo "SOFTROCE-RUN $name: $bin $*"
    start=$(uptime_s)
    (cd "$work" && exec timeout "$TEST_TIMEOUT_S" "$bin" "$@")
    rc=$?
    took=$(since "$start")
    if [ "$rc" != 0 ] && awk -v t="$took" -v l="$TEST_TIMEOUT_S" 'BEGIN { exit !(t >= l) }'; then
        say "$name was killed after ${TEST_TIMEOUT_S}s (QUIVER_SOFTROCE_TEST_TIMEOUT)"
    fi
    report "$name" "$rc" "$took"
}
for dir in /opt/quiver/tests/*; do
    [ -d "$dir" ] && run_test "$dir"
done

finish
