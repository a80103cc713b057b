#!/bin/bash
# Runs inside the booted test container (tests/systemd/run.sh puts it there and
# calls it phase by phase through `systemd-run --wait --pipe`, so it runs under
# the container's systemd, seccomp filter and capabilities, like any service).
#   inside.sh PHASE OLD_DEB NEW_DEB
# Prints "ok - ..." per check; exits 1 when one failed.
set -uo pipefail
export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin
phase=$1 old_deb=$2 new_deb=$3
failed=0
STATE=/var/lib/agentwarden
UNITS="agentwarden-daemon.service agentwarden-probe.service"

ok() { echo "ok - $*"; }
fail() { echo "FAIL - $*"; failed=1; }
check() {  # check "what" command...: ok when the command succeeds
    local what=$1; shift
    local out
    if out=$("$@" 2>&1); then ok "$what"; else fail "$what"; echo "$out" | sed 's/^/    /' | tail -n 20; fi
}
wait_for() {  # wait_for SECONDS "what" command...: poll until it succeeds
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then fail "$what (waited ${seconds}s)"; return 1; fi
        sleep 0.2
    done
    ok "$what"
}
mode_of() { stat -c '%a %U:%G' "$1"; }
expect_mode() { [ "$(mode_of "$2")" = "$1" ] && ok "$2 is $1" || fail "$2 is $(mode_of "$2" 2>&1), not $1"; }
prop() { systemctl show -p "$2" --value "$1"; }
active() { for u in "$@"; do [ "$(systemctl is-active "$u")" = active ] || return 1; done; }
healthy() { agentwarden status | grep -q "^probe:  up"; }
apt_install() { apt-get install -y -q -o Dpkg::Use-Pty=0 "$@" > /tmp/apt.log 2>&1 || { cat /tmp/apt.log; return 1; }; }
version() { dpkg-query -W -f='${Version}' agentwarden 2>/dev/null; }
archive_listing() { (cd "$STATE/archive" && find . -type f -printf '%p %s\n' | sort); }
archive_kept() {  # every file of /tmp/archive-before is still there, none shorter
    archive_listing | python3 -c '
import sys
before = dict(l.split() for l in open("/tmp/archive-before"))
after = dict(l.split() for l in sys.stdin)
sys.exit(0 if before and all(int(after.get(f, -1)) >= int(s) for f, s in before.items()) else 1)'
}
agent_cgroup() {  # the cgroup directory of a unit in agents.slice
    python3 -c 'import sys; from agentwarden import cgroups; print(cgroups.systemd_root(cgroups.cgroup2_root()) / "agents.slice" / sys.argv[1])' "$1"
}
session_cgroup() {  # the session cgroup `agentwarden run` made in a delegated unit
    find "$(agent_cgroup "$1")" -mindepth 1 -maxdepth 1 -type d -name 's-*' | grep .
}
archive_has() {  # archive_has AGENT PYTHON-EXPR: some archived record of AGENT satisfies EXPR
    agentwarden log search --agent "$1" --json > "/tmp/archive-$1.json" 2>/dev/null
    json_has "/tmp/archive-$1.json" "$2"
}
json_has() {  # json_has FILE PYTHON-EXPR: some JSON line of FILE satisfies EXPR (r is the record)
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if eval(sys.argv[2]):
        sys.exit(0)
sys.exit(1)' "$1" "$2"
}

journal_has() {  # journal_has "FIELD=VALUE ..." PYTHON-EXPR: some entry matching satisfies EXPR
    journalctl -o json $1 > /tmp/journal-match.json 2>/dev/null
    json_has /tmp/journal-match.json "$2"
}

case "$phase" in
install)
    # First without Recommends, so without kernel headers: postinst must say
    # what is missing and how to fix it; installing the headers afterwards
    # fires the package's trigger, which links them and starts the probe.
    arch=$(dpkg --print-architecture)
    check "apt installs $old_deb with its dependencies (no Recommends: no kernel headers)" \
        apt_install --no-install-recommends "$old_deb"
    if [ ! -e /lib/modules/$(uname -r)/build ]; then
        check "postinst said the headers are missing, and the command that fixes it" \
            grep -q "fix: apt-get install linux-headers-$(uname -r)" /tmp/apt.log
        check "... and for a kernel Debian has no headers for" \
            grep -q "or:  apt-get install linux-headers-$arch" /tmp/apt.log
        check "doctor's FAIL line was shown with its fix" \
            grep -q "^\[FAIL\] kernel headers: missing" /tmp/apt.log
        check "the probe is not running without headers" sh -c "! systemctl is-active --quiet agentwarden-probe"
        check "apt installs linux-headers-$arch (the Recommends)" apt_install --no-install-recommends "linux-headers-$arch"
        check "the trigger ran: headers linked" grep -q "agentwarden: Debian has no headers for kernel" /tmp/apt.log
    fi
    check "version is that of $old_deb" test "$(version)" = "$(dpkg-deb -f "$old_deb" Version)"
    check "admin group agentwarden exists" getent group agentwarden
    check "a man page per command, from the help (man -w agentwarden-policy-explain)" \
        test -s /usr/share/man/man1/agentwarden-policy-explain.1.gz -a -s /usr/share/man/man1/agentwarden.1.gz
    check "bash completion shipped" grep -q _AGENTWARDEN_COMPLETE /usr/share/bash-completion/completions/agentwarden
    check "agentwarden --version answers" sh -c "agentwarden --version | grep -q '^agentwarden [0-9]'"
    expect_mode "755 root:root" /etc/agentwarden
    expect_mode "750 root:agentwarden" /etc/agentwarden/policy.d
    expect_mode "750 root:agentwarden" /etc/agentwarden/agents
    expect_mode "700 root:root" $STATE
    expect_mode "644 root:root" /etc/agentwarden/config.toml
    expect_mode "750 root:agentwarden" /run/agentwarden
    build=/lib/modules/$(uname -r)/build
    if [ -f $STATE/kernel-headers-link ]; then
        check "no Debian headers for $(uname -r): generic ones linked at $build" \
            sh -c "readlink $build | grep -q '^/usr/src/linux-headers-.*-$(dpkg --print-architecture)\$'"
    fi
    check "kernel headers at $build" test -e "$build/include"
    wait_for 180 "both services active" active $UNITS
    wait_for 30 "agentwarden status: healthy (probe up)" healthy
    check "agentwarden doctor passes" agentwarden doctor
    wait_for 10 "the supervisor runs its compiled exec fast path" \
        sh -c "agentwarden status | grep -q 'exec fast path running'"
    expect_mode "660 root:agentwarden" /run/agentwarden/control.sock
    check "daemon is Type=notify with a watchdog" \
        test "$(prop agentwarden-daemon Type) $(prop agentwarden-daemon WatchdogUSec)" = "notify 10s"
    check "daemon reports its status to systemd" \
        sh -c "systemctl status agentwarden-daemon | grep -q 'Status: \".*events archived'"
    check "probe reports its status to systemd" \
        sh -c "systemctl status agentwarden-probe | grep -q 'Status: \"watching'"
    check "daemon's capability bounding set" \
        test "$(prop agentwarden-daemon CapabilityBoundingSet)" = \
             "cap_chown cap_dac_override cap_dac_read_search cap_kill cap_setgid cap_setuid cap_sys_chroot cap_sys_ptrace cap_bpf"
    check "probe's capability bounding set" \
        test "$(prop agentwarden-probe CapabilityBoundingSet)" = "cap_sys_admin cap_perfmon cap_bpf"
    check "logs go to the journal" sh -c "journalctl -u agentwarden-daemon | grep -q 'daemon running'"
    journalctl -o json -u agentwarden-daemon > /tmp/journal-daemon.json
    check "through python3-systemd's JournalHandler, with fields (journalctl -o json)" json_has /tmp/journal-daemon.json \
        "r.get('MESSAGE', '').startswith('daemon running') and r.get('SYSLOG_IDENTIFIER') == 'agentwarden-daemon' and r.get('LOGGER') == 'agentwarden.daemon' and r.get('PRIORITY') == '6'"
    journalctl -o json -u agentwarden-probe > /tmp/journal-probe.json
    check "the probe said it was compiling, then how long loading took" json_has /tmp/journal-probe.json \
        "r.get('MESSAGE', '').startswith('BPF program loaded and attached in ')"
    out=$(systemd-analyze verify agentwarden-daemon.service agentwarden-probe.service \
          agents.slice agent@verify.service agentwarden-fleet-archive.service 2>&1)
    if [ -z "$out" ]; then ok "systemd-analyze verify: clean for every unit"; else fail "systemd-analyze verify"; echo "$out" | sed 's/^/    /'; fi
    ;;

autotag)
    # An agent started the usual systemd way, never tagged. (Agent names start
    # with swt-: the container sees the host's cgroup tree, and so the host's
    # tagged cgroups too; its policies must not apply to them.)
    timeout 60 agentwarden tail --agent swt-coder --json > /tmp/tail-coder.json 2>&1 &
    tail_pid=$!
    check "systemd-run --slice=agents.slice --unit=agent-swt-coder starts an agent" \
        systemd-run --quiet --slice=agents.slice --unit=agent-swt-coder \
        /bin/sh -c 'while :; do /usr/bin/cat /etc/hostname > /dev/null; sleep 0.2; done'
    cgid=$(stat -c %i "$(agent_cgroup agent-swt-coder.service)")
    wait_for 30 "agentwarden tail shows agent swt-coder's exec of /usr/bin/cat, from its unit's cgroup" \
        json_has /tmp/tail-coder.json "r.get('kind') == 'exec' and r.get('exec_path') == '/usr/bin/cat' and r.get('agent') == 'swt-coder' and r.get('agent_cgroup_id') == $cgid"
    check "agentwarden agents lists swt-coder, found by agents.slice" \
        sh -c "agentwarden agents | grep -E '^swt-coder .*/agents.slice/agent-swt-coder.service .*by agents.slice'"
    check "agentwarden status lists agent swt-coder" sh -c "agentwarden status | grep -q 'agent swt-coder '"
    check "the agent has no tag xattr" python3 -c '
import sys
from agentwarden import cgroups
sys.exit(0 if cgroups.read_tag(sys.argv[1]) is None else 1)' "$(agent_cgroup agent-swt-coder.service)"
    systemctl stop agent-swt-coder.service
    kill $tail_pid 2>/dev/null
    ;;

template)
    # agent@NAME from /etc/agentwarden/agents/NAME.toml, as its own user.
    useradd --system --create-home --shell /usr/sbin/nologin reviewer 2>/dev/null
    cat > /etc/agentwarden/agents/swt-reviewer.toml <<'EOT'
command = ["/bin/sh", "-c", "while :; do /usr/bin/cat /etc/hostname > /dev/null; /usr/bin/sleep 0.3; done"]
user = "reviewer"
[task]
owner = "alice"
EOT
    # A session needs a policy: agent@ units run under `agentwarden run`.
    cat > /etc/agentwarden/policy.d/swt-reviewer.toml <<'EOT'
[agent.swt-reviewer]
mode = "enforce"
on-violation = "alert"
[agent.swt-reviewer.exec]
allow = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/usr/bin/cat", "/usr/bin/sleep"]
[agent.swt-reviewer.files]
read-allow = ["/**"]
write-allow = ["/dev/null"]
EOT
    check "policy reload" agentwarden policy reload
    check "agentwarden agent-config swt-reviewer: OK" sh -c "agentwarden agent-config swt-reviewer | grep -q '(OK)'"
    systemctl daemon-reload
    check "generator wrote agent@swt-reviewer's drop-in" \
        test -f /run/systemd/generator/agent@swt-reviewer.service.d/50-agentwarden.conf
    out=$(systemd-analyze verify agent@swt-reviewer.service 2>&1)
    if [ -z "$out" ]; then ok "systemd-analyze verify agent@swt-reviewer.service: clean"; else fail "systemd-analyze verify agent@swt-reviewer.service"; echo "$out" | sed 's/^/    /'; fi
    timeout 60 agentwarden tail --agent swt-reviewer --json > /tmp/tail-reviewer.json 2>&1 &
    tail_pid=$!
    check "systemctl start agent@swt-reviewer" systemctl start agent@swt-reviewer
    pid=$(prop agent@swt-reviewer MainPID)
    # `agentwarden run` (the main process: root, in the unit's own cgroup) starts the
    # command as its child, born in the session cgroup, as reviewer.
    wait_for 20 "it runs as user reviewer in agents.slice, in a session" sh -c \
        "test \"\$(ps -o user= -p \$(pgrep -o -P $pid))\" = reviewer && test \"\$(systemctl show -p Slice --value agent@swt-reviewer)\" = agents.slice"
    cmd=$(pgrep -o -P "$pid")
    check "its process is in the session cgroup below the unit, run's outside it" sh -c \
        "grep -q '/agent@swt-reviewer.service/s-' /proc/$cmd/cgroup && grep -q '/agent@swt-reviewer.service\$' /proc/$pid/cgroup"
    check "it has the task defaults" sh -c "tr '\\0' '\\n' < /proc/$cmd/environ | grep -qx AGENTWARDEN_TASK_OWNER=alice"
    wait_for 30 "tail shows agent swt-reviewer's exec of /usr/bin/cat" \
        json_has /tmp/tail-reviewer.json "r.get('kind') == 'exec' and r.get('exec_path') == '/usr/bin/cat'"
    kill $tail_pid 2>/dev/null

    # A violation, under the hardened daemon: kill the whole agent (cgroup.kill,
    # through ProtectSystem=strict + ReadWritePaths=/sys/fs/cgroup). (Killing
    # one process works by pid, and pids here are the container's, not the
    # host's that BPF reports: `agentwarden doctor` warns about that.)
    cat > /etc/agentwarden/policy.d/swt-intruder.toml <<'EOT'
[agent.swt-intruder]
mode = "enforce"
on-violation = "kill-agent"
[agent.swt-intruder.exec]
allow = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/usr/bin/cat"]
[agent.swt-intruder.files]
read-allow = ["/**"]
write-allow = ["/dev/null"]
EOT
    check "policy check: OK" agentwarden policy check
    check "policy reload" agentwarden policy reload
    # The archive, not a tail started just before: the agent is killed within
    # a second, sometimes before a new tail has subscribed.
    check "start agent-swt-intruder, which runs sleep (not allowed)" \
        systemd-run --quiet --slice=agents.slice --unit=agent-swt-intruder \
        /bin/sh -c 'while :; do /usr/bin/cat /etc/hostname > /dev/null; /usr/bin/sleep 0.3; done'
    wait_for 30 "the violation is recorded, and the daemon killed the agent's cgroup" \
        archive_has swt-intruder "r.get('kind') == 'violation' and 'sleep' in r.get('attempted', '') and r.get('action_taken', '').startswith('killed every process')"
    wait_for 10 "agent-swt-intruder is gone" sh -c "! systemctl is-active --quiet agent-swt-intruder"
    expect_mode "600 root:agentwarden" /run/agentwarden/priority.sock
    check "the priority lane carries the probe's exec records to the daemon under the units" \
        sh -c "agentwarden status --json | python3 -c 'import json, sys; sys.exit(json.load(sys.stdin)[\"daemon\"][\"counters\"].get(\"priority_records\", 0) < 1)'"
    wait_for 10 "journalctl -o json: the violation's entry carries AGENTWARDEN_AGENT and AGENTWARDEN_VERDICT" \
        journal_has "AGENTWARDEN_RECORD=violation AGENTWARDEN_AGENT=swt-intruder" \
        "r.get('AGENTWARDEN_VERDICT') == 'violation' and r.get('PRIORITY') == '4' and 'sleep' in r.get('MESSAGE', '') and r.get('AGENTWARDEN_SESSION', '').startswith('swt-intruder') and r.get('_SYSTEMD_UNIT') == 'agentwarden-daemon.service'"
    journalctl -o json -n 1 AGENTWARDEN_RECORD=violation AGENTWARDEN_AGENT=swt-intruder | python3 -c '
import json, sys
entry = json.loads(sys.stdin.read())
print("    " + json.dumps({k: v for k, v in entry.items() if k.startswith(("AGENTWARDEN_", "MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "_SYSTEMD_UNIT"))}, sort_keys=True))'
    for fmt in ocsf ecs; do
        agentwarden log export --format $fmt --agent swt-intruder > /tmp/export-intruder.$fmt 2>/dev/null
    done
    check "log export --format ocsf: the violation as a Detection Finding (2004)" json_has /tmp/export-intruder.ocsf \
        "r.get('class_uid') == 2004 and r.get('type_uid') == 200401 and 'sleep' in r['finding_info']['title'] and r['metadata']['product']['name'] == 'agentwarden'"
    check "log export --format ocsf: its execs as Process Activity (1007)" json_has /tmp/export-intruder.ocsf \
        "r.get('class_uid') == 1007 and r['process'].get('file', {}).get('path') == '/usr/bin/cat'"
    check "log export --format ecs: the violation as an intrusion_detection alert" json_has /tmp/export-intruder.ecs \
        "r['event']['kind'] == 'alert' and r['event']['category'] == ['intrusion_detection'] and r['agentwarden']['agent'] == 'swt-intruder'"

    # Prometheus metrics: off by default; on with metrics_listen and the
    # python3-prometheus-client Recommends (the unit allows AF_INET for it).
    check "apt installs python3-prometheus-client (a Recommends)" apt_install --no-install-recommends python3-prometheus-client
    mkdir -p /etc/agentwarden/config.d
    echo 'metrics_listen = "127.0.0.1:9464"' > /etc/agentwarden/config.d/50-swt-metrics.toml
    systemctl restart agentwarden-daemon
    wait_for 30 "agentwarden status: healthy after the restart" healthy
    wait_for 20 "a scrape of http://127.0.0.1:9464/metrics: daemon and probe up" python3 -c '
import sys, urllib.request
body = urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=5).read().decode()
sys.exit(0 if "agentwarden_daemon_up 1.0" in body and "agentwarden_probe_up 1.0" in body
         and "agentwarden_archive_bytes_written_total" in body else 1)'
    rm -f /etc/agentwarden/config.d/50-swt-metrics.toml
    systemctl restart agentwarden-daemon
    wait_for 30 "metrics off again: healthy" healthy
    systemctl reset-failed agent-swt-intruder 2>/dev/null
    ;;

held)
    # agent@NAME runs its command as a held session: an exec the policy holds
    # waits for an admin, here approved from the CLI.
    cat > /etc/agentwarden/policy.d/swt-holder.toml <<'EOT'
[agent.swt-holder]
mode = "enforce"
on-violation = "kill"
[agent.swt-holder.exec]
allow = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/usr/bin/sleep"]
hold = ["/usr/bin/date"]
[agent.swt-holder.files]
read-allow = ["/**"]
write-allow = ["/tmp/**", "/dev/null"]
EOT
    check "policy reload" agentwarden policy reload
    cat > /etc/agentwarden/agents/swt-holder.toml <<'EOT'
command = ["/bin/sh", "-c", "/usr/bin/date +held-%Y > /tmp/held-out; /usr/bin/sleep 600"]
user = "reviewer"
[task]
owner = "alice"
ticket = "OPS-7"
EOT
    systemctl daemon-reload
    rm -f /tmp/held-out
    check "systemctl start agent@swt-holder" systemctl start agent@swt-holder
    wait_for 20 "its exec of /usr/bin/date is held" sh -c "agentwarden holds --json | grep -q swt-holder"
    hold=$(agentwarden holds --json | python3 -c 'import json, sys; print([h["id"] for h in json.load(sys.stdin) if h["agent"] == "swt-holder"][0])')
    check "the hold names the person from the definition" sh -c "agentwarden holds | grep -q 'for alice'"
    check "nothing ran while held" test ! -s /tmp/held-out
    check "approve $hold from the CLI" agentwarden approve "$hold" --reason "systemd-test"
    wait_for 20 "the approved date ran, as user reviewer" sh -c \
        "grep -q held- /tmp/held-out && test \"\$(stat -c %U /tmp/held-out)\" = reviewer"
    check "the agent's command (run's child) runs as reviewer" sh -c \
        "test \"\$(ps -o user= -p \$(pgrep -o -P \$(systemctl show -p MainPID --value agent@swt-holder)))\" = reviewer"
    wait_for 20 "the archive has the approved hold" archive_has swt-holder \
        "r.get('kind') == 'hold' and r.get('state') == 'approved' and r.get('on_behalf_of') == 'alice'"
    unit_cg=$(agent_cgroup agent@swt-holder.service)
    systemctl stop agent@swt-holder
    check "stopping the unit removed its cgroups, the session's too" test ! -d "$unit_cg"
    ;;

drift)
    # Configuration drift under the packaged units: agent@swt-drift edits a
    # tracked file under /etc (sed -i, then chmod), each write held and
    # approved with --expires; `drift` lists the change with its content after
    # while the agent still runs, then expired; `drift revert` puts back the
    # exact bytes, mode and owner although the daemon's unit sees /etc
    # read-only (ProtectSystem=strict); the archive verifies.
    useradd --system --no-create-home --shell /usr/sbin/nologin swt-drifter 2>/dev/null
    install -d -o swt-drifter -g swt-drifter -m 755 /etc/swt-drift
    printf '# app\nmode=safe\nworkers=4\n' > /etc/swt-drift/app.conf
    chown root:root /etc/swt-drift/app.conf
    chmod 644 /etc/swt-drift/app.conf
    cp -p /etc/swt-drift/app.conf /tmp/swt-drift-original
    cat > /etc/agentwarden/policy.d/swt-drift.toml <<'EOT'
[agent.swt-drift]
mode = "enforce"
on-violation = "hold"
[agent.swt-drift.exec]
allow = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/usr/bin/sed", "/usr/bin/chmod", "/usr/bin/sleep"]
[agent.swt-drift.files]
read-allow = ["/**"]
write-allow = ["/tmp/**", "/dev/null"]
track = ["/etc/swt-drift/**"]
EOT
    check "policy reload" agentwarden policy reload
    cat > /etc/agentwarden/agents/swt-drift.toml <<'EOT'
command = ["/bin/sh", "-c", "/usr/bin/sed -i s/safe/fast/ /etc/swt-drift/app.conf && /usr/bin/chmod 600 /etc/swt-drift/app.conf; /usr/bin/sleep 600"]
user = "swt-drifter"
workdir = "/tmp"
[task]
owner = "alice"
EOT
    systemctl daemon-reload
    changed() { test "$(stat -c '%a %U' /etc/swt-drift/app.conf)" = "600 swt-drifter"; }
    check "the daemon's unit sees / read-only (ProtectSystem=strict)" sh -c \
        "test \"\$(systemctl show -p ProtectSystem --value agentwarden-daemon)\" = strict && awk '\$5 == \"/\" { print \$6 }' /proc/\$(systemctl show -p MainPID --value agentwarden-daemon)/mountinfo | grep -q '^ro'"
    check "systemctl start agent@swt-drift" systemctl start agent@swt-drift
    approved=0
    deadline=$((SECONDS + 60))
    until changed || [ $SECONDS -ge $deadline ]; do
        for hold in $(agentwarden holds --json | python3 -c 'import json, sys; print(" ".join(h["id"] for h in json.load(sys.stdin) if h["agent"] == "swt-drift"))'); do
            agentwarden approve "$hold" --expires 15s --reason "systemd-test drift" > /dev/null && approved=$((approved + 1))
        done
        sleep 0.2
    done
    edited() { changed && grep -q mode=fast /etc/swt-drift/app.conf && [ "$approved" -ge 3 ]; }
    check "sed -i and chmod changed the file (content, mode, owner) once their $approved holds were approved with --expires 15s" edited
    # sed's change, and chmod's (one, or two when the approvals took over a second).
    listed() {
        agentwarden drift --json --agent swt-drift > /tmp/drift-swt.json 2>/dev/null && python3 -c '
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if r["path"] == "/etc/swt-drift/app.conf"]
done = rows and all(r["after"] for r in rows) and rows[-1]["after"]["mode"] == 0o600
sys.exit(0 if done and all(r["state"] == sys.argv[2] and r["person"] == "alice" and r["approvers"] == ["root"]
                           and r["reason"] == "systemd-test drift" for r in rows) else 1)' /tmp/drift-swt.json "$1"
    }
    wait_for 20 "agentwarden drift lists the change active, with its content after, while the agent still runs" listed active
    check "the agent still runs" active agent@swt-drift.service
    wait_for 30 "fifteen seconds after the approval it is listed expired" listed expired
    wait_for 10 "agentwarden status says so" sh -c "agentwarden status | grep -Eq '^drift:  [1-9] expired changes to review \(agentwarden drift --expired\)'"
    wait_for 10 "the journal has the expiry (AGENTWARDEN_RECORD=drift, AGENTWARDEN_STATE=expired)" \
        journal_has "AGENTWARDEN_RECORD=drift AGENTWARDEN_PATH=/etc/swt-drift/app.conf" "r.get('AGENTWARDEN_STATE') == 'expired' and r.get('AGENTWARDEN_AGENT') == 'swt-drift'"
    for change in $(python3 -c 'import json, sys; print(" ".join(r["id"] for r in reversed(list(map(json.loads, open(sys.argv[1])))) if r["path"] == "/etc/swt-drift/app.conf"))' /tmp/drift-swt.json); do
        check "agentwarden drift revert $change (newest first)" agentwarden drift revert "$change" --reason "systemd-test revert"
        check "listed reverted" sh -c "agentwarden drift --agent swt-drift | grep -q '$change  reverted'"
    done
    check "the exact bytes are back" cmp /tmp/swt-drift-original /etc/swt-drift/app.conf
    expect_mode "644 root:root" /etc/swt-drift/app.conf
    wait_for 10 "agentwarden status: no expired change left" sh -c "agentwarden status | grep -q '^drift:  0 expired changes to review'"
    wait_for 20 "the archive has the revert, with the admin" archive_has swt-drift \
        "r.get('kind') == 'drift' and r.get('state') == 'reverted' and r['admin']['name'].startswith('root') and r['admin']['reason'] == 'systemd-test revert'"
    check "agentwarden log verify" agentwarden log verify
    systemctl stop agent@swt-drift
    rm -rf /etc/agentwarden/agents/swt-drift.toml /etc/agentwarden/policy.d/swt-drift.toml /etc/swt-drift \
        /tmp/swt-drift-original
    systemctl daemon-reload
    agentwarden policy reload > /dev/null
    ;;

restart)
    # `systemctl restart agentwarden-daemon` (and a kill -9 of it) mid-session is
    # a pause: the session's listener waits in the unit's fd store, the restarted
    # daemon resumes it, its next exec is decided, its pending hold is still
    # pending and can be approved.
    cat > /etc/agentwarden/policy.d/swt-restart.toml <<'EOT'
[agent.swt-restart]
mode = "enforce"
on-violation = "kill"
[agent.swt-restart.exec]
allow = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/usr/bin/sleep", "/usr/bin/touch"]
hold = ["/usr/bin/date"]
[agent.swt-restart.files]
read-allow = ["/**"]
write-allow = ["/tmp/**", "/dev/null"]
EOT
    check "policy reload" agentwarden policy reload
    cat > /etc/agentwarden/agents/swt-restart.toml <<'EOT'
command = ["/bin/sh", "-c", "/usr/bin/date +held-%Y > /tmp/restart-held & while :; do /usr/bin/touch /tmp/restart-tick; /usr/bin/sleep 0.2; done"]
user = "reviewer"
EOT
    systemctl daemon-reload
    rm -f /tmp/restart-held /tmp/restart-tick
    check "FileDescriptorStoreMax is set" test "$(prop agentwarden-daemon.service FileDescriptorStoreMax)" -gt 0
    check "systemctl start agent@swt-restart" systemctl start agent@swt-restart
    wait_for 20 "its exec of /usr/bin/date is held" sh -c "agentwarden holds --json | grep -q swt-restart"
    hold=$(agentwarden holds --json | python3 -c 'import json, sys; print([h["id"] for h in json.load(sys.stdin) if h["agent"] == "swt-restart"][0])')
    wait_for 20 "the session ticks" test -e /tmp/restart-tick
    agent_pid=$(prop agent@swt-restart MainPID)
    for how in "systemctl restart agentwarden-daemon" "systemctl kill -s KILL agentwarden-daemon"; do
        daemon_pid=$(prop agentwarden-daemon MainPID)
        check "$how" $how
        wait_for 30 "the daemon is back ($how)" sh -c \
            "test \"\$(systemctl show -p MainPID --value agentwarden-daemon)\" != $daemon_pid && agentwarden status >/dev/null"
        rm -f /tmp/restart-tick
        wait_for 30 "the session's next exec is decided after $how" test -e /tmp/restart-tick
        check "the session is the same process" test "$(prop agent@swt-restart MainPID)" = "$agent_pid"
        check "the unit is still active" active agent@swt-restart.service
        check "$hold is still pending" sh -c "agentwarden holds --json | grep -q '\"$hold\"'"
        check "nothing held ran" test ! -s /tmp/restart-held
    done
    check "approve $hold after the restarts" agentwarden approve "$hold" --reason "systemd-test restart"
    wait_for 20 "the approved date ran" grep -q held- /tmp/restart-held
    wait_for 20 "the archive has the resumed session" archive_has swt-restart \
        "r.get('kind') == 'supervision' and r.get('state') == 'resumed' and r.get('holds_resumed') == ['$hold']"
    wait_for 20 "the archive has the approved hold" archive_has swt-restart \
        "r.get('kind') == 'hold' and r.get('state') == 'approved' and r.get('hold_id') == '$hold'"
    systemctl stop agent@swt-restart
    rm -f /etc/agentwarden/agents/swt-restart.toml /etc/agentwarden/policy.d/swt-restart.toml
    systemctl daemon-reload
    agentwarden policy reload >/dev/null
    ;;
watchdog)
    pid=$(prop agentwarden-daemon MainPID)
    restarts=$(prop agentwarden-daemon NRestarts)
    kill -STOP "$pid"
    ok "daemon (pid $pid) hung with SIGSTOP"
    wait_for 60 "the watchdog restarted it" sh -c \
        "[ \"\$(systemctl show -p MainPID --value agentwarden-daemon)\" != $pid ] && [ \"\$(systemctl is-active agentwarden-daemon)\" = active ]"
    check "restart counter went up by one" test "$(prop agentwarden-daemon NRestarts)" = $((restarts + 1))
    check "the journal says why" sh -c "journalctl -u agentwarden-daemon | grep -q 'Watchdog timeout'"
    check "the old process is gone" sh -c "! kill -0 $pid 2>/dev/null"
    wait_for 30 "healthy again: the probe reconnected" healthy
    ;;

killprobe)
    # An agent's worst move: kill -9 the probe. The daemon freezes every agent
    # at once, systemd starts the probe again, and agents thaw once it watches.
    # (agent@ units are restarted with the probe instead: Requires=.)
    systemd-run --quiet --slice=agents.slice --unit=agent-swt-watched \
        /bin/sh -c 'while :; do /usr/bin/sleep 0.3; done'
    systemctl start agent@swt-reviewer
    wait_for 30 "healthy" healthy
    cg=$(agent_cgroup agent-swt-watched.service)
    reviewer_pid=$(prop agent@swt-reviewer MainPID)
    probe_pid=$(prop agentwarden-probe MainPID)
    kill -9 "$probe_pid"
    wait_for 2 "agent-swt-watched frozen within 2 s of kill -9 of the probe" grep -qx "frozen 1" "$cg/cgroup.events"
    wait_for 120 "systemd started the probe again" sh -c \
        "[ \"\$(systemctl show -p MainPID --value agentwarden-probe)\" != $probe_pid ] && systemctl is-active --quiet agentwarden-probe"
    wait_for 60 "agent-swt-watched thawed once the probe watches again" grep -qx "frozen 0" "$cg/cgroup.events"
    wait_for 60 "agent@swt-reviewer runs again, restarted with the probe" sh -c \
        "systemctl is-active --quiet agent@swt-reviewer && [ \"\$(systemctl show -p MainPID --value agent@swt-reviewer)\" != $reviewer_pid ]"
    agentwarden log search --kind watch --json > /tmp/watch.json 2>&1
    check "the archive says the watch was lost (agents frozen)" \
        json_has /tmp/watch.json "r.get('state') == 'lost' and 'froze' in r.get('action_taken', '')"
    check "and restored" json_has /tmp/watch.json "r.get('state') == 'restored'"
    systemctl stop agent@swt-reviewer agent-swt-watched
    ;;

stop)
    systemctl start agent@swt-reviewer
    archive_before=$(archive_listing | wc -l)
    start=$SECONDS
    check "systemctl stop probe and daemon" systemctl stop $UNITS
    took=$((SECONDS - start))
    for u in $UNITS; do
        check "$u stopped cleanly (inactive, result success, exit 0)" test \
            "$(systemctl is-active $u) $(prop $u Result) $(prop $u ExecMainStatus)" = "inactive success 0"
    done
    check "stopping took ${took}s (under 10s: no kill after timeout)" test $took -lt 10
    check "agent@swt-reviewer stopped with the probe (never unwatched)" sh -c "! systemctl is-active --quiet agent@swt-reviewer"
    check "no traceback in the journal" sh -c "! journalctl -u 'agentwarden-*' | grep -q Traceback"
    check "no agentwarden process left" sh -c "! pgrep -f '^/usr/bin/python3 -I -m agentwarden'"
    check "the archive is there ($archive_before files)" test "$archive_before" -gt 0
    check "start again" systemctl start $UNITS
    wait_for 30 "healthy again" healthy
    ;;

upgrade)
    mkdir -p /etc/agentwarden/config.d
    echo 'tag_scan_interval = 0.25' > /etc/agentwarden/config.d/50-test.toml
    archive_listing > /tmp/archive-before
    daemon_pid=$(prop agentwarden-daemon MainPID)
    systemctl start agent@swt-reviewer
    agent_pid=$(prop agent@swt-reviewer MainPID)
    check "apt upgrades to $new_deb" apt_install "$new_deb"
    check "version is that of $new_deb" test "$(version)" = "$(dpkg-deb -f "$new_deb" Version)"
    wait_for 180 "both services active again" active $UNITS
    check "the daemon was restarted" test "$(prop agentwarden-daemon MainPID)" != "$daemon_pid"
    check "agent@swt-reviewer was restarted with the probe, and runs" sh -c \
        "systemctl is-active --quiet agent@swt-reviewer && test \"\$(systemctl show -p MainPID --value agent@swt-reviewer)\" != $agent_pid"
    wait_for 30 "healthy" healthy
    check "every archive file from before is still there, none shorter" archive_kept
    check "the config drop-in survived and is in force" sh -c \
        "agentwarden config | grep -E '^tag_scan_interval = 0.25 .*config.d/50-test.toml'"
    check "policy and agent definitions survived" test -f /etc/agentwarden/policy.d/swt-intruder.toml -a \
        -f /etc/agentwarden/agents/swt-reviewer.toml
    expect_mode "750 root:agentwarden" /etc/agentwarden/policy.d
    ;;

remove)
    archive_listing > /tmp/archive-before
    check "apt removes agentwarden" sh -c "apt-get remove -y -q agentwarden > /tmp/apt.log 2>&1"
    check "dpkg: removed, config files kept" test "$(dpkg-query -W -f='${Status}' agentwarden)" = "deinstall ok config-files"
    for u in $UNITS agent@swt-reviewer.service; do
        check "$u is not running" sh -c "! systemctl is-active --quiet $u"
    done
    check "no agentwarden process left" sh -c "! pgrep -f '^/usr/bin/python3 -I -m agentwarden'"
    check "program, units and python package gone (no __pycache__ left)" sh -c \
        "! test -e /usr/bin/agentwarden -o -e /lib/systemd/system/agentwarden-daemon.service -o -e /usr/lib/python3/dist-packages/agentwarden"
    check "the archive is kept: every file from before, none shorter" archive_kept
    check "config, group kept" sh -c "test -f /etc/agentwarden/config.toml && getent group agentwarden"
    check "reinstall brings it back with the archive" apt_install "$new_deb"
    wait_for 180 "both services active" active $UNITS
    wait_for 30 "healthy" healthy
    ;;

purge)
    check "apt purges agentwarden (state not asked for)" sh -c "apt-get purge -y -q agentwarden > /tmp/apt.log 2>&1"
    check "dpkg: gone" sh -c "! dpkg-query -W agentwarden 2>/dev/null | grep -q ."
    check "config.toml gone, the admin's files kept" sh -c \
        "! test -e /etc/agentwarden/config.toml && test -f /etc/agentwarden/policy.d/swt-intruder.toml"
    check "the archive is kept" test -d $STATE/archive
    check "the kernel headers link is gone" sh -c "! test -L /lib/modules/$(uname -r)/build"
    check "no unit symlinks or masks left" sh -c "! find /etc/systemd/system -name '*agentwarden*' | grep -q ."
    check "/run/agentwarden gone" test ! -e /run/agentwarden
    # Install again and purge with the state: nothing of agentwarden is left.
    check "reinstall" apt_install "$new_deb"
    wait_for 180 "both services active" active $UNITS
    rm -rf /etc/agentwarden/policy.d/swt-intruder.toml /etc/agentwarden/agents/swt-reviewer.toml \
        /etc/agentwarden/policy.d/swt-reviewer.toml /etc/agentwarden/policy.d/swt-holder.toml \
        /etc/agentwarden/agents/swt-holder.toml /etc/agentwarden/config.d/50-test.toml
    check "purge with AGENTWARDEN_PURGE_STATE=yes" sh -c \
        "AGENTWARDEN_PURGE_STATE=yes apt-get purge -y -q agentwarden > /tmp/apt.log 2>&1"
    check "the archive is gone, as asked" test ! -e $STATE
    left=$(find / -xdev -name '*agentwarden*' -not -path '/proc/*' -not -path '/debs/*' \
           -not -path '/var/cache/apt/*' -not -path '/usr/local/sbin/*' 2>/dev/null)
    if [ -z "$left" ]; then ok "no file of agentwarden is left"; else fail "files left behind"; echo "$left" | sed 's/^/    /'; fi
    check "only the admin group stays (Debian leaves system groups)" getent group agentwarden
    ;;

*)
    echo "inside.sh: unknown phase $phase" >&2
    exit 2
    ;;
esac
exit $failed
