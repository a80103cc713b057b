#!/bin/sh
# Idempotent set-up of a Debian machine for running and testing agentwarden:
# Debian packages, kernel headers BCC can compile against, and a venv.
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (it installs Debian packages and links kernel headers)" >&2
    exit 1
fi

say() { echo "setup: $*"; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    say "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. Debian packages: BCC and libseccomp bindings exist only there; the rest
#    are bookworm's versions, which the .deb depends on too; gcc builds the
#    supervisor's fast path (step 4).
missing=""
for pkg in python3-bpfcc python3-seccomp python3-venv python3-setuptools python3-pip \
           python3-zmq python3-msgpack python3-psutil python3-typer python3-pytest python3-systemd \
           python3-prometheus-client python3-cryptography nats-server \
           mount util-linux gcc libc6-dev; do
    installed "$pkg" || missing="$missing $pkg"
done
[ -z "$missing" ] || apt_install $missing

# 2. Kernel headers. Those of the running kernel when Debian has them;
#    otherwise Debian's generic headers, linked where BCC looks. The BPF
#    program reads only tracepoint arguments, so another version compiles it.
release=$(uname -r)
build=/lib/modules/$release/build
if [ ! -e "$build" ]; then
    if apt-cache show "linux-headers-$release" >/dev/null 2>&1 ||
       { [ "$apt_updated" = 0 ] && apt-get update -qq && apt_updated=1 &&
         apt-cache show "linux-headers-$release" >/dev/null 2>&1; }; then
        apt_install "linux-headers-$release"
    else
        arch=$(dpkg --print-architecture)
        installed "linux-headers-$arch" || apt_install "linux-headers-$arch"
        generic=$(ls -d /usr/src/linux-headers-*-"$arch" | sort -V | tail -n 1)
        common=$(echo "$generic" | sed "s/-$arch\$/-common/")
        say "no headers for kernel $release in Debian; linking $generic"
        mkdir -p "/lib/modules/$release"
        ln -sfn "$generic" "$build"
        [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$release/source"
    fi
fi

# 3. The venv, seeing Debian's bcc and seccomp; the package installed editable
#    with Debian's setuptools (no download needed).
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.agentwarden-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing agentwarden into .venv"
    # pip writes its entry script here: not through the link to the launcher (step 6)
    [ ! -L .venv/bin/agentwarden ] || rm .venv/bin/agentwarden
    .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e . 
    touch "$stamp"
fi
# 4. import-linter from PyPI (Debian has none) for the layers contract that the
#    tests check. 2.5 is the newest release that needs neither click >= 8.2 nor
#    rich, which would shadow Debian's click and change typer's output.
if [ ! -x .venv/bin/lint-imports ]; then
    say "installing import-linter into .venv (PyPI)"
    .venv/bin/python -m pip install -q "import-linter==2.5" ||
        { echo "setup: installing import-linter from PyPI failed (is PyPI reachable?)" >&2; exit 1; }
fi
# 4b. nats-py from PyPI (Debian has none) for the fleet (docs/fleet.md); pure
#     Python with no dependencies, so nothing shadows Debian's packages.
if ! .venv/bin/python -c "import nats" 2>/dev/null; then
    say "installing nats-py into .venv (PyPI)"
    .venv/bin/python -m pip install -q --no-deps "nats-py==2.16.0" ||
        { echo "setup: installing nats-py from PyPI failed (is PyPI reachable?)" >&2; exit 1; }
fi
# 5. The supervisor's compiled fast path for allowed execs.
stale=$([ -f daemon/_fastpath.so ] && find daemon/fastpath.c bpf/fastpath.h bpf/agentwarden.h \
    -newer daemon/_fastpath.so || echo missing)
if [ -n "$stale" ]; then
    say "building daemon/_fastpath.so"
    sh scripts/build-fastpath.sh
fi
# 6. The session launcher, which is also the venv's `agentwarden` command
#    (it hands every line but `run` to the venv's Python CLI).
stale=$([ -f agentwarden/_launcher ] && find launcher/agentwarden.c scripts/launcher-constants.py \
    scripts/build-launcher.sh agentwarden/settings.py agentwarden/cgroups.py agentwarden/wire.py \
    agentwarden/errors.py agentwarden/session.py -newer agentwarden/_launcher || echo missing)
if [ -n "$stale" ]; then
    say "building agentwarden/_launcher"
    sh scripts/build-launcher.sh "$PWD/.venv/bin/python"
fi
ln -sfn "$PWD/agentwarden/_launcher" .venv/bin/agentwarden
.venv/bin/python -c "import bcc, seccomp, zmq, msgpack, typer, psutil, pytest, importlinter, nats, cryptography" ||
    { echo "setup: the venv cannot import its dependencies" >&2; exit 1; }
