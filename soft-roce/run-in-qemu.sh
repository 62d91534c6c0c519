#!/usr/bin/env bash
# run-in-qemu.sh: run test binaries against a real soft-RoCE device (the kernel's
# rdma_rxe driver plus rdma-core's rxe provider) inside a throwaway qemu guest.
#
# Why a guest: CI hosts and many developer kernels have no RDMA at all, and
# rdma_rxe needs a kernel module. Debian ships a kernel with CONFIG_RDMA_RXE=m;
# we download that package (never install it), boot it under qemu's software
# emulation (TCG; KVM is not assumed to work), and run everything on one rxe
# device, rxe0, on a dummy netdev. The guest has no NIC: no packet leaves it.
#
# Usage: run-in-qemu.sh [--perftest SIZE] [BIN[::ARG...] ...]
#   BIN::ARG1::ARG2   runs BIN with the arguments ARG1 ARG2 (split on "::").
#   --perftest SIZE   also runs perftest's ib_send_lat and ib_write_lat (-s SIZE)
#                     on rxe0 before the binaries, for comparison in the same run.
# Exit status: 0 all passed; 1 a test failed; 2 bad usage or host setup failed;
# 3 the guest never reported a result (timeout, panic, boot failure).
# Knobs (environment) and what the guest does: soft-roce/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRATCH=${QUIVER_SOFTROCE_DIR:-/tmp/quiver-soft-roce}
TIMEOUT_S=${QUIVER_SOFTROCE_TIMEOUT:-600}
TEST_TIMEOUT_S=${QUIVER_SOFTROCE_TEST_TIMEOUT:-$TIMEOUT_S}
# The chunkserver tests run up to four servers, each with its fabric arena
# (about 130 MiB) registered, so pinned, beside files that live in memory:
# 2 GiB ran out (the OOM killer took a server in a membership test).
MEM_MB=${QUIVER_SOFTROCE_MEM_MB:-3072}
CPUS=${QUIVER_SOFTROCE_CPUS:-2}
PERFTEST_ITERS=${QUIVER_SOFTROCE_PERFTEST_ITERS:-10000}
PERFTEST_ARGS=${QUIVER_SOFTROCE_PERFTEST_ARGS:-}
PASS_ENV=${QUIVER_SOFTROCE_PASS_ENV:-}
KERNEL_PKG=${QUIVER_SOFTROCE_KERNEL_PKG:-}
KERNEL_ARGS=${QUIVER_SOFTROCE_KERNEL_ARGS:-}
# Under TCG the guest kernel distrusts the TSC and picks HPET, which has no
# vDSO: every clock_gettime becomes a syscall and an emulated MMIO read (about
# 1 us, measured). Real machines read the clock in user space; so does the
# guest with this (perftest reads the TSC directly either way).
CLOCK_ARGS="clocksource=tsc tsc=reliable"
INSTALL=${QUIVER_SOFTROCE_INSTALL:-1}

# apt can wait on a network or on another apt holding the lock; bound both.
APT_TIMEOUT_S=900
APT_LOCK_WAIT_S=300
# Grace period between SIGTERM and SIGKILL for a guest that overran its time.
QEMU_KILL_GRACE_S=10
# Kernel modules the guest loads; their dependency closure comes along.
# crc32_generic: rxe's ICRC asks the crypto API for "crc32", and nothing else
# in the closure provides it. rdma_ucm: lets tests use librdmacm if they want.
GUEST_MODULES="dummy crc32_generic ib_uverbs rdma_rxe rdma_ucm"

T0=$(date +%s%N)
elapsed() { local ms=$((($(date +%s%N) - $1) / 1000000)); printf '%d.%01d' $((ms / 1000)) $((ms % 1000 / 100)); }
log() { printf 'run-in-qemu [%6ss] %s\n' "$(elapsed "$T0")" "$*" >&2; }
die() { printf 'run-in-qemu: error: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '/^# Usage:/,/^# Knobs/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

positive() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
for knob in TIMEOUT=$TIMEOUT_S TEST_TIMEOUT=$TEST_TIMEOUT_S MEM_MB=$MEM_MB CPUS=$CPUS \
    PERFTEST_ITERS=$PERFTEST_ITERS; do
    positive "${knob#*=}" || die "QUIVER_SOFTROCE_${knob%%=*} must be a positive integer, got '${knob#*=}'"
done

# ---- arguments ----------------------------------------------------------------
PERFTEST_SIZE=""
SPECS=()
while [ $# -gt 0 ]; do
    case $1 in
        --perftest)
            [ $# -ge 2 ] || die "--perftest needs a message size in bytes"
            PERFTEST_SIZE=$2; shift 2 ;;
        --perftest=*)
            PERFTEST_SIZE=${1#--perftest=}; shift ;;
        -h|--help) usage ;;
        --) shift; SPECS+=("$@"); break ;;
        -*) die "unknown option '$1' (try --help)" ;;
        *) SPECS+=("$1"); shift ;;
    esac
done

[ -z "$PERFTEST_SIZE" ] || positive "$PERFTEST_SIZE" \
    || die "--perftest SIZE must be a positive integer (bytes), got '$PERFTEST_SIZE'"

# Each spec: BIN or BIN::ARG1::ARG2. Check every binary before doing any work.
# split_spec SPEC: sets path and the array args.
split_spec() {
    local rest
    path=${1%%::*}
    args=()
    [[ $1 == *::* ]] || return 0
    rest=${1#*::}
    while [[ $rest == *::* ]]; do args+=("${rest%%::*}"); rest=${rest#*::}; done
    args+=("$rest")
}
TEST_SPEC=() TEST_PATH=() TEST_NAME=()
declare -A NAME_SEEN=()
for spec in "${SPECS[@]}"; do
    split_spec "$spec"
    [ -n "$path" ] || die "empty binary path in '$spec'"
    [ -f "$path" ] || die "test binary '$path' does not exist (or is not a regular file)"
    [ -x "$path" ] || die "test binary '$path' is not executable"
    for a in "${args[@]}"; do [[ $a != *$'\n'* ]] || die "an argument of '$path' contains a newline"; done
    name=$(basename "$path")
    seen=${NAME_SEEN[$name]:-0}
    NAME_SEEN[$name]=$((seen + 1))
    [ "$seen" -eq 0 ] || name="$name#$((seen + 1))"
    TEST_SPEC+=("$spec")
    TEST_PATH+=("$(realpath "$path")")
    TEST_NAME+=("$name")
done
[ ${#SPECS[@]} -gt 0 ] || [ -n "$PERFTEST_SIZE" ] \
    || log "no binaries given: the run only checks that rxe0 comes up"

for name in $PASS_ENV; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "QUIVER_SOFTROCE_PASS_ENV: '$name' is not a variable name"
done

# ---- host packages ------------------------------------------------------------
# Only what the run uses: qemu, a static busybox for the guest's userland,
# the verbs tools and rxe provider, kmod (depmod, modprobe --show-depends),
# cpio, iproute2 (ip, rdma). perftest only when asked for.
PKGS="qemu-system-x86 busybox-static ibverbs-utils ibverbs-providers kmod cpio iproute2"
[ -z "$PERFTEST_SIZE" ] || PKGS="$PKGS perftest"

for tool in dpkg-query apt-get apt-cache; do
    command -v "$tool" >/dev/null \
        || die "this script needs a Debian-family host ($tool not found): it boots Debian's kernel package"
done

apt_get() {
    timeout "$APT_TIMEOUT_S" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT_S" "$@"
}

missing=()
for p in $PKGS; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$INSTALL" = 1 ] || die "host packages missing: ${missing[*]} (QUIVER_SOFTROCE_INSTALL=0 forbids installing them)"
    [ "$(id -u)" -eq 0 ] || die "host packages missing: ${missing[*]}; run as root, or: sudo apt-get install ${missing[*]}"
    log "installing host packages: ${missing[*]}"
    apt_log=$(mktemp)
    if ! { apt_get update -q && apt_get install -y -q --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
        tail -n 20 "$apt_log" >&2
        rm -f "$apt_log"
        die "could not install host packages: ${missing[*]} (apt-get output above)"
    fi
    rm -f "$apt_log"
fi

# ---- one run at a time per scratch dir ----------------------------------------
mkdir -p "$SCRATCH/kernel"
exec 9>"$SCRATCH/lock"
if ! flock -n 9; then
    log "another run holds $SCRATCH/lock; waiting up to ${TIMEOUT_S}s"
    flock -w "$TIMEOUT_S" 9 || die "$SCRATCH is still in use by another run after ${TIMEOUT_S}s"
fi

# ---- Debian's kernel: downloaded and unpacked, never installed ---------------------
if [ -z "$KERNEL_PKG" ]; then
    resolve_kernel() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'; }
    KERNEL_PKG=$(resolve_kernel)
    if [ -z "$KERNEL_PKG" ] && [ "$(id -u)" -eq 0 ]; then
        log "apt-cache does not know linux-image-amd64; running apt-get update"
        apt_get update -q >/dev/null 2>&1 || true
        KERNEL_PKG=$(resolve_kernel)
    fi
    if [ -z "$KERNEL_PKG" ]; then
        # Offline with a warm cache is fine: use the newest kernel already unpacked.
        KERNEL_PKG=$(find "$SCRATCH/kernel" -mindepth 1 -maxdepth 1 -type d -name 'linux-image-*' \
            -printf '%f\n' | sort -V | tail -n 1)
        [ -n "$KERNEL_PKG" ] || die "cannot tell which kernel package linux-image-amd64 depends on (apt-get update failed?); set QUIVER_SOFTROCE_KERNEL_PKG"
        log "apt cannot resolve linux-image-amd64; using the cached $KERNEL_PKG"
    fi
fi
KROOT="$SCRATCH/kernel/$KERNEL_PKG"
if [ ! -d "$KROOT/boot" ]; then
    log "downloading $KERNEL_PKG (about 70 MB, once; cached in $SCRATCH/kernel)"
    dl="$SCRATCH/kernel/download.tmp"
    rm -rf "$dl" "$KROOT.tmp"
    mkdir -p "$dl"
    # apt-get download drops privileges to _apt unless it is root in a directory _apt
    # cannot write; the resulting "unsandboxed" warning is noise here.
    if ! (cd "$dl" && timeout "$APT_TIMEOUT_S" apt-get download -q "$KERNEL_PKG") >"$dl.log" 2>&1; then
        grep -v 'Download is performed unsandboxed' "$dl.log" | tail -n 20 >&2
        die "could not download $KERNEL_PKG with apt-get download (output above)"
    fi
    debs=("$dl"/*.deb)
    [ -f "${debs[0]}" ] || die "apt-get download $KERNEL_PKG produced no .deb"
    dpkg-deb -x "${debs[0]}" "$KROOT.tmp" || die "could not unpack ${debs[0]}"
    mv "$KROOT.tmp" "$KROOT"
    rm -rf "$dl" "$dl.log"
    # Debian moved linux-image-amd64 to a new kernel: the old one (400 MB) is dead weight.
    for old in "$SCRATCH"/kernel/linux-image-*; do
        [ "$old" = "$KROOT" ] || { log "removing the superseded $(basename "$old")"; rm -rf "$old"; }
    done
fi
kvers=("$KROOT"/lib/modules/*)
[ -d "${kvers[0]}" ] || die "$KROOT has no lib/modules; delete it and retry"
KVER=$(basename "${kvers[0]}")
VMLINUZ="$KROOT/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] || die "$VMLINUZ is missing; delete $KROOT and retry"
# The package ships no modules.dep (it is made at install time); make it once.
[ -f "$KROOT/lib/modules/$KVER/modules.dep" ] || depmod -b "$KROOT" "$KVER"
log "kernel $KERNEL_PKG ($KVER)"

# ---- initramfs ------------------------------------------------------------------
R="$SCRATCH/initramfs"
rm -rf "$R"
mkdir -p "$R"/usr/{bin,sbin,lib64,lib/x86_64-linux-gnu/libibverbs} \
    "$R"/{dev,proc,sys,tmp,run,root,etc/quiver,etc/libibverbs.d,opt/quiver/bin,opt/quiver/tests}
ln -s usr/bin "$R/bin"; ln -s usr/sbin "$R/sbin"; ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"

# Kernel modules: the closure of GUEST_MODULES, dependencies first, each once.
MODDIR="lib/modules/$KVER"
modlist="$R/etc/quiver/modules"
: >"$modlist"
for m in $GUEST_MODULES; do
    modprobe --show-depends -d "$KROOT" -S "$KVER" "$m" \
        || die "kernel $KVER has no usable module '$m' (modprobe --show-depends failed)"
done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$R/etc/quiver/modules.paths"
while read -r ko; do
    rel=${ko#"$KROOT/$MODDIR/"}
    mkdir -p "$R/$MODDIR/$(dirname "$rel")"
    # busybox insmod reads plain .ko files only; unpack compressed ones here.
    case $ko in
        *.ko.xz)  xz -dc "$ko" >"$R/$MODDIR/${rel%.xz}"; rel=${rel%.xz} ;;
        *.ko.zst) zstd -qdc "$ko" >"$R/$MODDIR/${rel%.zst}"; rel=${rel%.zst} ;;
        *)        cp "$ko" "$R/$MODDIR/$rel" ;;
    esac
    echo "$rel" >>"$modlist"
done <"$R/etc/quiver/modules.paths"
rm "$R/etc/quiver/modules.paths"
grep -q 'rdma_rxe\.ko$' "$modlist" || die "rdma_rxe is not in kernel $KVER's module closure"
cp "$KROOT/$MODDIR"/modules.{order,builtin,builtin.modinfo} "$R/$MODDIR/"
depmod -b "$R" "$KVER"   # lets the guest's modprobe serve the kernel's request_module()
log "modules: $(sed 's|.*/||; s|\.ko$||' "$modlist" | tr '\n' ' ')"

# Userland: busybox, iproute2's ip and rdma, the verbs tools, the rxe provider.
cp /bin/busybox "$R/usr/bin/busybox"
HOST_BINS=()
# copy_tool NAME PACKAGE GUEST_DIR: the host's NAME into the guest.
copy_tool() {
    local src
    src=$(command -v "$1") || die "'$1' not found on the host (package $2)"
    cp "$src" "$R$3/$1"
    HOST_BINS+=("$R$3/$1")
}
copy_tool ip iproute2 /usr/sbin
copy_tool rdma iproute2 /usr/bin
copy_tool ibv_devices ibverbs-utils /usr/bin
copy_tool ibv_devinfo ibverbs-utils /usr/bin
if [ -n "$PERFTEST_SIZE" ]; then
    copy_tool ib_send_lat perftest /usr/bin
    copy_tool ib_write_lat perftest /usr/bin
fi
providers=(/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so)
for f in "${providers[0]}" /etc/libibverbs.d/rxe.driver; do
    [ -f "$f" ] || die "the rxe verbs provider is missing: no $f (package ibverbs-providers)"
done
cp "${providers[0]}" "$R${providers[0]}"; HOST_BINS+=("${providers[0]}")
cp /etc/libibverbs.d/rxe.driver "$R/etc/libibverbs.d/"

# The test binaries, each file once however many times it is listed.
declare -A GUEST_BIN=()   # host path -> guest path
declare -A GUEST_TAKEN=()
for i in "${!TEST_PATH[@]}"; do
    host=${TEST_PATH[$i]}
    if [ -z "${GUEST_BIN[$host]:-}" ]; then
        base=$(basename "$host"); g=$base; n=1
        while [ -n "${GUEST_TAKEN[$g]:-}" ]; do n=$((n + 1)); g="$base-$n"; done
        GUEST_TAKEN[$g]=1
        GUEST_BIN[$host]="/opt/quiver/bin/$g"
        cp "$host" "$R/opt/quiver/bin/$g"
        HOST_BINS+=("$host")
    fi
    d=$(printf '%s/opt/quiver/tests/%03d' "$R" "$i")
    mkdir -p "$d"
    printf '%s\n' "${TEST_NAME[$i]}" >"$d/name"
    ln -s "${GUEST_BIN[$host]}" "$d/bin"
    split_spec "${TEST_SPEC[$i]}"
    : >"$d/args"
    [ ${#args[@]} -eq 0 ] || printf '%s\n' "${args[@]}" >"$d/args"
done

# Shared libraries: what ldd names for everything above, plus two that are only
# ever dlopen()ed: libibverbs.so.1 (Quiver loads it at run time, so ldd of our
# binaries never shows it) and libgcc_s.so.1 (glibc loads it for thread exit and
# cancellation; without it a thread exit aborts).
shared_libs() {
    local f out
    for f in "$@"; do
        # A static binary makes ldd fail with "not a dynamic executable": nothing to copy.
        out=$(ldd "$f" 2>&1) || continue
        if grep -q 'not found' <<<"$out"; then
            die "$f needs libraries the host does not have: $(grep 'not found' <<<"$out" | tr -s ' \t\n' ' ')"
        fi
        awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out"
    done
}
libdir=/usr/lib/x86_64-linux-gnu
for lib in libibverbs.so.1 libgcc_s.so.1; do
    [ -e "$libdir/$lib" ] || die "$libdir/$lib is missing on the host"
done
{ shared_libs "${HOST_BINS[@]}" "$libdir/libibverbs.so.1"; echo "$libdir/libibverbs.so.1"; echo "$libdir/libgcc_s.so.1"; } \
    | sort -u | while read -r lib; do
        [ -e "$R$lib" ] && continue
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
    done

# busybox applets for everything else; a real binary of the same name wins.
for a in $(/bin/busybox --list); do
    [ -e "$R/usr/bin/$a" ] || [ -e "$R/usr/sbin/$a" ] || ln -s busybox "$R/usr/bin/$a"
done
echo "root:x:0:0:root:/root:/bin/sh" >"$R/etc/passwd"
echo "root:x:0:" >"$R/etc/group"
install -m 755 "$HERE/guest-init.sh" "$R/init"

# What the guest needs to know, as shell assignments it sources.
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
{
    echo "PERFTEST_SIZE=$(shq "$PERFTEST_SIZE")"
    echo "PERFTEST_ITERS=$(shq "$PERFTEST_ITERS")"
    echo "PERFTEST_ARGS=$(shq "$PERFTEST_ARGS")"
    echo "TEST_TIMEOUT_S=$(shq "$TEST_TIMEOUT_S")"
    for name in $PASS_ENV; do
        [ -z "${!name+set}" ] || echo "export $name=$(shq "${!name}")"
    done
} >"$R/etc/quiver/run.conf"

# Uncompressed: the guest unpacks it with a memcpy instead of gunzip under emulation.
INITRD="$SCRATCH/initrd.cpio"
(cd "$R" && find . -print0 | cpio --null -o -H newc --owner=0:0 --quiet) >"$INITRD"
log "initramfs: $(du -sh "$INITRD" | cut -f1), ${#TEST_PATH[@]} test(s)${PERFTEST_SIZE:+, perftest -s $PERFTEST_SIZE}"

# ---- boot -----------------------------------------------------------------------
SERIAL="$SCRATCH/serial.log"
log "booting $KVER: qemu-system-x86_64 -accel tcg -cpu max -smp $CPUS -m $MEM_MB (timeout ${TIMEOUT_S}s)"
T_BOOT=$(date +%s%N)
set +e
timeout --kill-after="$QEMU_KILL_GRACE_S" "$TIMEOUT_S" \
    qemu-system-x86_64 -accel tcg -cpu max -smp "$CPUS" -m "$MEM_MB" \
        -nographic -no-reboot -nic none \
        -kernel "$VMLINUZ" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 quiet $CLOCK_ARGS $KERNEL_ARGS" </dev/null 2>&1 \
    | sed -u 's/\r$//; s/\x1bc//g; s/\x1b\[[0-9;?]*[A-Za-z]//g' | tee "$SERIAL"
qemu_rc=${PIPESTATUS[0]}
set -e
log "guest ran $(elapsed "$T_BOOT")s (qemu exit $qemu_rc); serial log: $SERIAL"

# ---- verdict ----------------------------------------------------------------------
# The last result line counts: a test's own output cannot end the run early.
result=$(awk '/^SOFTROCE-RESULT: / { r = $2 } END { print r }' "$SERIAL")
echo "=== soft-RoCE summary ($(elapsed "$T0")s wall)"
grep -a '^SOFTROCE-TEST ' "$SERIAL" || true
if [ "$qemu_rc" -eq 124 ] || [ "$qemu_rc" -eq 137 ]; then
    echo "SOFTROCE-RESULT: FAIL (the guest did not finish within ${TIMEOUT_S}s; raise QUIVER_SOFTROCE_TIMEOUT?)"
    exit 3
fi
case $result in
    PASS) echo "SOFTROCE-RESULT: PASS"; exit 0 ;;
    FAIL) echo "SOFTROCE-RESULT: FAIL"; exit 1 ;;
    *) echo "SOFTROCE-RESULT: FAIL (the guest printed no result: boot failure or kernel panic? see $SERIAL)"; exit 3 ;;
esac
