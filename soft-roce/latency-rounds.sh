#!/bin/sh
# Runs inside the soft-RoCE guest (give it to run-in-qemu.sh with --perftest,
# which installs perftest, and the quiver binary): alternates perftest's
# ib_send_lat and `quiver bench fabric --transport verbs` ping-pong at one
# size, ROUNDS times, so both see the same emulation noise. Prints one line per
# measurement:
#   ROUND n ib_send_lat t_typical_us
#   ROUND n quiver p50_us
# Usage: latency-rounds.sh [ROUNDS] [SIZE]   (defaults 3, 64)
ROUNDS=${1:-3}
SIZE=${2:-64}
DEV=${QUIVER_RDMA_DEVICE:-rxe0}
GID=${QUIVER_RDMA_GID_INDEX:-1}
QUIVER=/opt/quiver/bin/quiver
PORT=18600
i=1
while [ "$i" -le "$ROUNDS" ]; do
    ib_send_lat -d "$DEV" -x "$GID" -s "$SIZE" -n 10000 -p "$PORT" -F >/tmp/lat.server 2>&1 &
    server=$!
    n=0
    while [ $n -lt 100 ] && ! netstat -ltn 2>/dev/null | grep -q ":$PORT "; do
        n=$((n + 1))
        sleep 0.1
    done
    typical=$(ib_send_lat -d "$DEV" -x "$GID" -s "$SIZE" -n 10000 -p "$PORT" -F 127.0.0.1 2>&1 \
        | awk -v s="$SIZE" '$1 == s { print $5 }')
    wait "$server"
    echo "ROUND $i ib_send_lat ${typical:-failed}"
    p50=$("$QUIVER" bench fabric --transport verbs --size "$SIZE" --iters 5000 --warmup 500 --json 2>/dev/null \
        | sed -n 's/.*"p50_us": *\([0-9.]*\).*/\1/p' | head -1)
    echo "ROUND $i quiver ${p50:-failed}"
    PORT=$((PORT + 1))
    i=$((i + 1))
done
