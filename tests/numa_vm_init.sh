#!/bin/busybox sh
# numa_vm_init.sh - /init of the two-NUMA-node VM that tests/numa_vm.sh boots
# (tests/test_numa_vm.py reads what it prints). Busybox only; numoe, its
# libraries, the model and numa_vm_probe are in the initramfs under /numoe.
#
# What it does, printing "NUMOE-VM <key> ..." lines on the serial console:
#   1. the nodes as the kernel sees them, and `numoe topology`;
#   2. `numoe generate` with its defaults (one worker per node, split), its
#      logits dumped into a FIFO, which gives two pause points that do not
#      depend on timing:
#        P1: nobody reads the FIFO yet, so the coordinator waits in open(2)
#            after the workers registered (their shards built, the
#            coordinator's expert pages dropped): probe the workers' threads,
#            their shards and the coordinator's pages;
#        P2: the FIFO is open but not read: the coordinator blocks in write(2)
#            once the pipe is full, in the middle of the decode: probe again,
#            kill -9 the node-1 worker, wait for its restart to re-map its
#            shard, probe the new process;
#      then the FIFO is drained, the run ends, and its exit status, stderr,
#      logits (base64) and whatever is left in /dev/shm or the process
#      table are printed;
#   3. "NUMOE-VM done", power off.
# Any step that does not reach its state within WAIT_S prints
# "NUMOE-VM error ..." and powers off: the test fails with that line.

/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin:/numoe/bin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs tmp /tmp
exec >/dev/console 2>&1

. /numoe/vm.conf # TOKENS, NPRED, WAIT_S

say() { echo "NUMOE-VM $*"; }
off() {
    sync
    poweroff -f
    sleep 60
}
fail() {
    say "error $*"
    [ -f /tmp/gen.err ] && sed 's/^/NUMOE-VM gen-stderr| /' /tmp/gen.err
    off
}
# every line of a file or command output, prefixed
lines() { sed "s/^/NUMOE-VM $1| /"; }

# waits until the command succeeds (checked every 50 ms), at most WAIT_S seconds
wait_for() {
    what=$1
    shift
    i=0
    while ! "$@"; do
        i=$((i + 1))
        [ $i -gt $((WAIT_S * 20)) ] && fail "waited $WAIT_S s for $what"
        [ -n "$GEN" ] && ! kill -0 "$GEN" 2>/dev/null && fail "numoe generate ended while waiting for $what"
        sleep 0.05
    done
}

# pids of the live children of $1 named $2 (comm, 15 bytes at most)
children() {
    cat /proc/[0-9]*/stat 2>/dev/null | awk -v pp="$1" -v c="($2)" '$2 == c && $4 == pp && $3 != "Z" {print $1}'
}

# "K PID" of each worker registered so far (from the launcher's lines)
worker_pid() { sed -n "s/^numoe: worker $1: pid \([0-9]*\), .*/\1/p" /tmp/gen.err | tail -n 1; }

# the main thread of $1 asleep in syscall $2 at kernel function $3 (/proc/PID/syscall
# reads "running" while it runs): open(2) of a FIFO without a reader, write(2) to a full pipe
blocked_in() {
    { read -r nr rest </proc/$1/syscall && fn=$(cat /proc/$1/wchan); } 2>/dev/null || return 1 # wchan: no newline
    [ "$nr" = "$2" ] && [ "$fn" = "$3" ]
}

# threads of worker W (pid P): "threads wW TID CPUS COMM", and its shard
probe_worker() {
    w=$1
    p=$2
    tag=$3
    for t in /proc/$p/task/*; do
        say "threads $tag w$w $(basename $t) $(awk '/^Cpus_allowed_list/ {print $2}' $t/status) $(cat $t/comm)"
    done
    say "policy $tag w$w $(grep -m1 ' heap' /proc/$p/numa_maps | awk '{print $2}')"
    grep -- "-shard-$w" /proc/$p/numa_maps | lines "numa_maps $tag w$w"
    say "shard-map $tag w$w $(numa_vm_probe pid $p -shard-$w || echo failed)"
    # the shard is a memfd the launcher holds (--shard-fd FD): opened again through /proc
    fd=$(tr '\0' '\n' < /proc/$p/cmdline | grep -A1 -x -- --shard-fd | tail -n 1)
    say "shard-file $tag w$w $(numa_vm_probe file /proc/$p/fd/$fd || echo failed) inode=$(stat -L -c %i /proc/$p/fd/$fd)"
}

probe_coordinator() {
    tag=$1
    say "coord-experts $tag $(numa_vm_probe pid $C /numoe/model.gguf /numoe/experts.ranges || echo failed)"
    say "coord-model $tag $(numa_vm_probe pid $C /numoe/model.gguf || echo failed)"
    say "coord-shard $tag $(numa_vm_probe pid $C -shard- || echo failed)"
    say "coord-wchan $tag $(cat /proc/$C/wchan) $(cut -d' ' -f1 /proc/$C/syscall)"
}

say start
for n in /sys/devices/system/node/node[0-9]*; do
    say "node ${n##*node} cpus $(cat $n/cpulist) $(awk '/MemTotal/ {print $4 " kB"}' $n/meminfo)"
done
numoe topology --model /numoe/model.gguf 2>&1 | lines topology

# ---- the generation, held at P1 ----
mkfifo /tmp/dump.fifo
numoe generate --model /numoe/model.gguf --tokens "$TOKENS" -n "$NPRED" --dump-logits /tmp/dump.fifo \
    >/tmp/gen.out 2>/tmp/gen.err &
L=$!
GEN=$L
say "launcher $L"
has_coordinator() {
    C=$(children $L numoe-coordinat)
    [ -n "$C" ]
}
wait_for "the coordinator process" has_coordinator
wait_for "the coordinator to wait for a reader of its logits (P1)" blocked_in $C 257 wait_for_partner
W0=$(worker_pid 0)
W1=$(worker_pid 1)
[ -n "$W0" ] && [ -n "$W1" ] || fail "no pids of two workers in the launcher's lines"
say "pids coordinator=$C w0=$W0 w1=$W1"
probe_coordinator p1
probe_worker 0 $W0 p1
probe_worker 1 $W1 p1

# ---- P2: the reader is there but reads nothing ----
exec 3</tmp/dump.fifo
wait_for "the coordinator to block on the full logits pipe (P2)" blocked_in $C 1 pipe_write
say "tokens-at-p2 $(cat /tmp/gen.out)"
probe_coordinator p2
probe_worker 0 $W0 p2
probe_worker 1 $W1 p2
kill -9 $W1
say "killed w1 $W1"
remapped() { grep -q "^numoe-worker 1: re-mapped its persistent shard" /tmp/gen.err; }
wait_for "worker 1 to be restarted and re-map its shard" remapped
has_new_w1() { # the launcher's new process: a worker child that is neither of the first two
    N1=$(children $L numoe-worker | grep -v -x -e "$W0" -e "$W1" | head -n 1)
    [ -n "$N1" ]
}
wait_for "the new worker 1 process" has_new_w1
say "restarted w1 $N1"
probe_worker 1 $N1 restart

# ---- drain the FIFO: the run ends ----
cat <&3 >/tmp/vm-logits.bin &
CAT=$!
exec 3<&-
wait $L
rc=$?
GEN=
wait $CAT
say "gen-rc $rc"
lines gen-stderr </tmp/gen.err
say "gen-stdout $(cat /tmp/gen.out)"
say "logits-bytes $(stat -c %s /tmp/vm-logits.bin)"
base64 /tmp/vm-logits.bin | lines logits
say "shm-left [$(ls -A /dev/shm | tr '\n' ' ')]"
say "procs-left [$(cat /proc/[0-9]*/stat 2>/dev/null | awk '$2 ~ /^\(numoe/ {printf "%s%s:%s ", $1, $2, $3}')]"
say done
off
