#!/bin/sh
# Compiles the supervisor's fast path (daemon/fastpath.c) into a shared
# library: scripts/build-fastpath.sh [OUTPUT] (default daemon/_fastpath.so).
# It includes bpf/fastpath.h (and agentwarden.h), shared with the BPF program.
# Used by make setup and by the .deb build; needs gcc and libc6-dev.
set -eu
cd "$(dirname "$0")/.."
out=${1:-daemon/_fastpath.so}
command -v gcc >/dev/null || { echo "build-fastpath: gcc is missing (apt-get install gcc libc6-dev)" >&2; exit 1; }
gcc -O2 -g -Wall -Wextra -Werror -fPIC -shared -pthread -D_FORTIFY_SOURCE=2 \
    -fstack-protector-strong -Wl,-z,relro,-z,now -Ibpf -o "$out.tmp" daemon/fastpath.c
mv "$out.tmp" "$out"
