#!/bin/sh
# Compiles the session launcher (launcher/agentwarden.c), which is also the
# installed `agentwarden` command: scripts/build-launcher.sh PYTHON [OUTPUT]
# (default output agentwarden/_launcher). PYTHON runs the Python CLI for every
# line the launcher does not take (`PYTHON -I -m agentwarden ...`: isolated, so
# neither PYTHONPATH nor the current directory can shadow the package); it must
# import this tree's agentwarden package, whose definitions become
# launcher/constants.h (scripts/launcher-constants.py).
# Used by make setup and by the .deb build; needs gcc and libc6-dev.
set -eu
cd "$(dirname "$0")/.."
python=$1
out=${2:-agentwarden/_launcher}
command -v gcc >/dev/null || { echo "build-launcher: gcc is missing (apt-get install gcc libc6-dev)" >&2; exit 1; }
PYTHONPATH="$PWD" "$python" -P scripts/launcher-constants.py > launcher/constants.h.tmp
mv launcher/constants.h.tmp launcher/constants.h
gcc -O2 -g -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -fstack-protector-strong -Wl,-z,relro,-z,now \
    -DAW_PYTHON="\"$python\"" -o "$out.tmp" launcher/agentwarden.c
mv "$out.tmp" "$out"
