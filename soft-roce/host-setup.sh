#!/usr/bin/env bash
# host-setup.sh: give a developer machine a soft-RoCE device, for a kernel that
# has the rdma_rxe driver. (No rdma_rxe, as on our CI host? Use run-in-qemu.sh.)
#
# Usage: host-setup.sh up NETDEV     load rdma_rxe, add rxe0 on NETDEV, wait until
#                                    its port is ACTIVE, print the env to export
#        host-setup.sh down NETDEV   remove rxe0 from NETDEV (the module stays loaded)
# Needs root, modprobe (kmod) and rdma (iproute2). The device name is rxe0, or
# QUIVER_RXE_NAME. RoCE traffic goes out through NETDEV; to keep it inside the
# machine use a dummy netdev (soft-roce/README.md shows how).
set -euo pipefail

RXE=${QUIVER_RXE_NAME:-rxe0}
PORT_ACTIVE_WAIT_S=10   # rxe's port goes ACTIVE within a second of a running netdev

die() { printf 'host-setup: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'host-setup: %s\n' "$*"; }
usage() { sed -n '/^# Usage:/,/^# Needs/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//; /^Needs/d' >&2; exit 2; }

[ $# -eq 2 ] || usage
ACTION=$1 NETDEV=$2
case $ACTION in up|down) ;; *) usage ;; esac
[ "$(id -u)" -eq 0 ] || die "must run as root (it loads a kernel module and adds an RDMA link)"
for tool in ip rdma; do
    command -v "$tool" >/dev/null || die "the '$tool' tool is missing (Debian/Ubuntu package: iproute2)"
done
ip link show dev "$NETDEV" >/dev/null 2>&1 \
    || die "no network interface '$NETDEV' (see: ip -brief link)"

# The netdev the link RXE sits on, or nothing when there is no such link.
rxe_netdev() {
    { rdma link show "$RXE/1" 2>/dev/null || true; } | sed -n 's/.* netdev \([^ ]*\).*/\1/p'
}

# rdma_rxe loaded (or built in), else why not, in words a user can act on.
load_rxe() {
    local kver err config where
    [ -d /sys/module/rdma_rxe ] && return 0
    kver=$(uname -r)
    if command -v modprobe >/dev/null; then
        err=$(modprobe rdma_rxe 2>&1) && return 0
    else
        err="modprobe not found (Debian/Ubuntu package: kmod)"
        if find "/lib/modules/$kver" -name 'rdma_rxe.ko*' 2>/dev/null | grep -q .; then
            die "the rdma_rxe module exists for kernel $kver but cannot be loaded: $err"
        fi
    fi
    for config in "/boot/config-$kver" /proc/config.gz; do
        [ -r "$config" ] || continue
        where=$(zcat -f "$config" 2>/dev/null | grep -E '^(# )?CONFIG_(INFINIBAND|RDMA_RXE)[= ]' | paste -sd, - || true)
        [ -n "$where" ] && err="$err; $config says: $where"
        break
    done
    die "this kernel ($kver) has no usable rdma_rxe module: $err.
  Soft-RoCE needs the kernel's rdma_rxe driver (CONFIG_RDMA_RXE). On Ubuntu it is in
  linux-modules-extra-$kver; Debian's stock kernels have it. Without it, run the tests
  in a qemu guest that has it: soft-roce/run-in-qemu.sh BIN..."
}

# Index of the port's IPv4-mapped RoCE v2 GID, or nothing.
ipv4_gid_index() {
    local port=/sys/class/infiniband/$RXE/ports/1 g n
    for g in "$port"/gids/*; do
        n=${g##*/}
        case $(cat "$g" 2>/dev/null) in 0000:0000:0000:0000:0000:ffff:*) ;; *) continue ;; esac
        [ "$(cat "$port/gid_attrs/types/$n" 2>/dev/null)" = "RoCE v2" ] && { echo "$n"; return 0; }
    done
    return 0
}

up() {
    local on state i gid
    load_rxe
    on=$(rxe_netdev)
    if [ -n "$on" ] && [ "$on" != "$NETDEV" ]; then
        die "$RXE already exists on netdev $on; run: $0 down $on"
    elif [ -n "$on" ]; then
        say "$RXE is already on $NETDEV"
    else
        rdma link add "$RXE" type rxe netdev "$NETDEV" \
            || die "rdma link add $RXE type rxe netdev $NETDEV failed (message above)"
        say "added $RXE on $NETDEV"
    fi
    state=/sys/class/infiniband/$RXE/ports/1/state
    for ((i = 0; i < PORT_ACTIVE_WAIT_S * 10; i++)); do
        grep -q ACTIVE "$state" 2>/dev/null && break
        sleep 0.1
    done
    grep -q ACTIVE "$state" 2>/dev/null \
        || die "$RXE port 1 is not ACTIVE after ${PORT_ACTIVE_WAIT_S}s (state: $(cat "$state" 2>&1)); is $NETDEV up with a carrier? (ip link set $NETDEV up)"
    rdma link show "$RXE/1"
    gid=$(ipv4_gid_index)
    if [ -z "$gid" ]; then
        say "warning: $RXE has no IPv4-mapped RoCE v2 GID: $NETDEV has no IPv4 address (ip addr add ADDR/LEN dev $NETDEV)"
        gid=1
    fi
    say "ready; for Quiver's tests:"
    echo "export QUIVER_RDMA_DEVICE=$RXE QUIVER_RDMA_GID_INDEX=$gid"
}

down() {
    local on
    on=$(rxe_netdev)
    if [ -z "$on" ]; then
        say "there is no $RXE; nothing to do"
        return 0
    fi
    [ "$on" = "$NETDEV" ] || die "$RXE is on netdev $on, not $NETDEV; not removing it"
    rdma link delete "$RXE" || die "rdma link delete $RXE failed (message above)"
    say "removed $RXE from $NETDEV (rdma_rxe stays loaded; modprobe -r rdma_rxe unloads it)"
}

"$ACTION"
