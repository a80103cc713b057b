#!/bin/bash
# `make systemd-test`: agentwarden's .deb under a real systemd.
#
# Builds the package twice (the second with a bumped version, for the upgrade),
# debootstraps a Debian bookworm root once (cached in .cache/systemd-test, so
# later runs start in seconds), boots a copy of it with systemd-nspawn, and runs
# tests/systemd/inside.sh phase by phase in it: install with apt, services and
# status, auto-tagging of agents.slice, agent@.service, held sessions, drift (a
# revert under the unit's read-only /etc), held sessions surviving a
# daemon restart, the watchdog, a clean
# stop, upgrade, remove and purge. Cleans up what nspawn leaves behind.
#
# Needs root; installs debootstrap, systemd-container and dpkg-dev when missing.
# KEEP=1 leaves the container running at the end (prints how to enter it);
# PHASES="install autotag" runs only those phases (in that order).
set -euo pipefail
cd "$(dirname "$0")/../.."
top=$(pwd)

CACHE=$top/.cache/systemd-test
RECIPE=1                                  # bump when the cached root's recipe changes
GOLDEN=$CACHE/bookworm-root-v$RECIPE
ROOT=$CACHE/run-root
ARCHIVES=$CACHE/apt-archives
LOGS=$CACHE/logs
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
MACHINE=agentwarden-systemd-test
say() { echo "systemd-test: $*"; }
die() { echo "systemd-test: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and systemd-nspawn need it)"
started=$SECONDS

# -- host prerequisites ---------------------------------------------------------
missing=""
for pkg in debootstrap systemd-container dpkg-dev python3-setuptools; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    say "installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
cgroot=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
[ -n "$cgroot" ] || die "cgroup v2 is not mounted (systemd-nspawn boots the container on it)"

# -- the two packages -----------------------------------------------------------
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
arch=$(dpkg --print-architecture)
old_deb=agentwarden_${version}_${arch}.deb
new_deb=agentwarden_${version}+systemdtest1_${arch}.deb
sh packaging/build-deb.sh >/dev/null
DEB_VERSION=${version}+systemdtest1 sh packaging/build-deb.sh >/dev/null
say "built dist/$old_deb and dist/$new_deb"

# -- the bookworm root (cached) ---------------------------------------------------
mkdir -p "$CACHE" "$ARCHIVES" "$LOGS"
if [ ! -f "$GOLDEN/.complete" ]; then
    say "debootstrapping bookworm into $GOLDEN (once; about a minute)"
    rm -rf "$GOLDEN" "$GOLDEN.tmp"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps \
        bookworm "$GOLDEN.tmp" "$MIRROR" > "$LOGS/debootstrap.log" 2>&1 ||
        { tail -n 20 "$LOGS/debootstrap.log" >&2; die "debootstrap failed (log: $LOGS/debootstrap.log)"; }
    cat > "$GOLDEN.tmp/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    # No timers fighting over the apt lock during the test; a fresh machine id per boot.
    for unit in apt-daily.timer apt-daily-upgrade.timer; do
        ln -sf /dev/null "$GOLDEN.tmp/etc/systemd/system/$unit"
    done
    : > "$GOLDEN.tmp/etc/machine-id"
    echo "$MACHINE" > "$GOLDEN.tmp/etc/hostname"
    touch "$GOLDEN.tmp/.complete"
    mv "$GOLDEN.tmp" "$GOLDEN"
fi
say "copying the cached root"
rm -rf "$ROOT"
cp -a "$GOLDEN" "$ROOT"
install -m 0755 tests/systemd/inside.sh "$ROOT/usr/local/sbin/inside.sh"

# -- boot ------------------------------------------------------------------------
# nspawn runs in a cgroup of its own; it creates payload/ and supervisor/ below
# it (and a mirror in the v1 name=systemd hierarchy on hybrid hosts), which we
# remove afterwards, with the lock and propagation directories it leaves in /run.
cgroup=$cgroot/$MACHINE
nspawn_pid=""
had_nspawn_run_dir=$([ -d /run/systemd/nspawn ] && echo yes || echo no)
cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        if [ "${KEEP:-0}" = 1 ]; then
            say "KEEP=1: the container stays up; enter it with: nsenter -t $leader -a bash"
            say "stop it with: nsenter -t $leader -a systemctl poweroff"
            return
        fi
        [ -n "${leader:-}" ] && kill -s SIGRTMIN+4 "$leader" 2>/dev/null  # poweroff
        for _ in $(seq 150); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    for dir in "$cgroup" /sys/fs/cgroup/systemd/"$MACHINE"; do
        [ -d "$dir" ] && find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null
        [ -d "$dir" ] && echo "systemd-test: warning: could not remove $dir" >&2
    done
    rm -rf "/run/systemd/nspawn/propagate/$MACHINE" "/run/systemd/nspawn/unix-export/$MACHINE"
    if [ "$had_nspawn_run_dir" = no ]; then rm -rf /run/systemd/nspawn; fi
    return 0
}
trap cleanup EXIT
[ ! -d "$cgroup" ] || find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
mkdir "$cgroup"

# --system-call-filter: nspawn's default seccomp filter refuses bpf() and
#   perf_event_open() (EPERM); the probe needs both.
# --capability: nspawn's default set lacks CAP_BPF and CAP_PERFMON.
# SYSTEMD_NSPAWN_USE_CGNS=0: BPF sees a cgroup's depth from the host's root
#   (bpf_get_current_ancestor_cgroup_id); inside a cgroup namespace the probe
#   cannot know it (agentwarden doctor says so). Without one, the container sees
#   the host's cgroup tree read-only and its own subtree writable, as on a host.
# apt's archive cache is shared with the host copy, so packages are downloaded once.
(
    echo $BASHPID > "$cgroup/cgroup.procs"
    exec env SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 SYSTEMD_NSPAWN_USE_CGNS=0 \
        systemd-nspawn --boot --register=no --keep-unit --quiet \
        --system-call-filter="bpf perf_event_open" --capability=CAP_BPF,CAP_PERFMON \
        --machine="$MACHINE" --directory="$ROOT" \
        --bind="$ARCHIVES:/var/cache/apt/archives" --bind-ro="$top/dist:/debs" \
        < /dev/null > "$LOGS/console.log" 2>&1
) &
nspawn_pid=$!
boot_started=$SECONDS
leader=""
for _ in $(seq 150); do
    leader=$(pgrep -P "$nspawn_pid" -x systemd || true)
    [ -n "$leader" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || { cat "$LOGS/console.log" >&2; die "systemd-nspawn exited"; }
    sleep 0.2
done
[ -n "$leader" ] || { cat "$LOGS/console.log" >&2; die "the container's systemd did not start"; }
in_ct() { nsenter --target "$leader" --all "$@"; }
for _ in $(seq 300); do  # until PID 1 listens on its private socket, then until booted
    state=$(timeout 60 nsenter --target "$leader" --all systemctl is-system-running --wait 2>&1 || true)
    case "$state" in *"Failed to connect"*) sleep 0.2 ;; *) break ;; esac
done
case "$state" in
    running|degraded) say "booted in $((SECONDS - boot_started))s (system $state)" ;;
    *) cat "$LOGS/console.log" >&2; die "the container did not boot: $state" ;;
esac
[ "$state" = running ] || in_ct systemctl --failed --no-legend | sed 's/^/systemd-test:   failed unit: /'

# -- the phases ------------------------------------------------------------------
# Each runs as a transient service of the container's systemd, so it sees what
# any service there sees (nspawn's seccomp filter and capabilities included).
failures=0
for phase in ${PHASES:-install autotag template held drift restart watchdog killprobe stop upgrade remove purge}; do
    t=$SECONDS
    say "== $phase"
    if ! in_ct systemd-run --quiet --wait --pipe --collect --unit="systemd-test-$phase" \
            -p TimeoutStartSec=600 /usr/local/sbin/inside.sh "$phase" "/debs/$old_deb" "/debs/$new_deb" \
            < /dev/null 2>&1 | sed 's/^/  /'; then
        failures=$((failures + 1))
    fi
    # pipefail: a failing phase makes the pipeline fail
    say "   ($phase: $((SECONDS - t))s)"
    if [ $failures -gt 0 ]; then
        in_ct journalctl --no-pager -u 'agentwarden-*' -u 'agent*' > "$LOGS/journal.log" 2>&1 || true
        say "phase $phase failed; the container's journal for agentwarden is in $LOGS/journal.log"
        break
    fi
done
say "total $((SECONDS - started))s"
if [ $failures != 0 ]; then
    say "the container's root stays in $ROOT for a look"
    exit 1
fi
cleanup
trap - EXIT
[ "${KEEP:-0}" = 1 ] || rm -rf "$ROOT"
say "all phases passed"
