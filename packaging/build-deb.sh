#!/bin/sh
# `make deb`: dist/agentwarden_<version>_<arch>.deb, built with Debian's own tools
# (Debian's setuptools for the wheel, dpkg-deb for the package), offline.
# DEB_VERSION overrides the version (default: pyproject.toml's).
set -eu
cd "$(dirname "$0")/.."

PYTHON=/usr/bin/python3   # Debian's, whatever python3 is first in PATH
version=${DEB_VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)}
case "$version" in
    [0-9]*) ;;
    *) echo "build-deb: bad version '$version' (must start with a digit)" >&2; exit 1 ;;
esac
for tool in dpkg-deb "$PYTHON" gcc; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool is missing (apt-get install dpkg-dev python3-setuptools gcc libc6-dev)" >&2; exit 1; }
done
arch=$(dpkg --print-architecture)   # the supervisor's fast path is compiled

work=build/deb
root=$work/root
rm -rf "$work"
mkdir -p "$root/DEBIAN" dist

# Python package: a wheel from pyproject.toml (its package-dir mapping decides
# what goes where), unpacked into Debian's dist-packages.
mkdir -p "$work"
if ! "$PYTHON" -c 'import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))' \
        "$work/wheel" > "$work/wheel.log" 2>&1; then
    cat "$work/wheel.log" >&2
    echo "build-deb: building the wheel failed (output above)" >&2
    exit 1
fi
wheel=$(tail -n 1 "$work/wheel.log")
site=$root/usr/lib/python3/dist-packages
mkdir -p "$site"
"$PYTHON" -m zipfile -e "$work/wheel/$wheel" "$site"
rm -f "$site"/agentwarden-*.dist-info/RECORD
find "$site" -name '__pycache__' -prune -exec rm -rf {} +
sh scripts/build-fastpath.sh "$site/agentwarden/daemon/_fastpath.so"

# The session launcher is /usr/bin/agentwarden: `run` starts there, every
# other line goes on to `python3 -I -m agentwarden`.
sh scripts/build-launcher.sh "$PYTHON" "$site/agentwarden/_launcher"
mkdir -p "$root/usr/bin"
ln -s ../lib/python3/dist-packages/agentwarden/_launcher "$root/usr/bin/agentwarden"
# Man pages and bash completion from the commands' own help (agentwarden/cli/manpage.py),
# from the unpacked package (-P: not the source tree, whose layout differs).
PYTHONPATH=$site "$PYTHON" -P -m agentwarden.cli.manpage "$root/usr/share/man/man1" >/dev/null
mkdir -p "$root/usr/share/bash-completion/completions"
PYTHONPATH=$site "$PYTHON" -P -m agentwarden --show-completion bash \
    > "$root/usr/share/bash-completion/completions/agentwarden"
for unit in agentwarden-daemon.service agentwarden-probe.service agents.slice 'agent@.service' agentwarden-bpffs.service \
        agentwarden-fleet-archive.service; do   # the collector's: installed, not enabled
    install -D -m 0644 "systemd/$unit" "$root/lib/systemd/system/$unit"
done
install -D -m 0755 packaging/agentwarden-generator "$root/lib/systemd/system-generators/agentwarden-agents"
install -D -m 0644 systemd/agentwarden.tmpfiles "$root/usr/lib/tmpfiles.d/agentwarden.conf"
install -D -m 0755 packaging/link-kernel-headers "$root/usr/lib/agentwarden/link-kernel-headers"
install -D -m 0644 packaging/config.toml "$root/etc/agentwarden/config.toml"
doc=$root/usr/share/doc/agentwarden
install -D -m 0644 packaging/copyright "$doc/copyright"
install -D -m 0644 README.md "$doc/README.md"
for page in docs/*.md; do   # README.md links to docs/NAME.md: same layout under $doc
    install -D -m 0644 "$page" "$doc/$page"
done
install -D -m 0644 packaging/coder.toml.example "$doc/examples/coder.toml"
printf 'agentwarden (%s) unstable; urgency=medium\n\n  * Built from %s.\n\n -- agentwarden developers <agentwarden@example.invalid>  %s\n' \
    "$version" "$(git describe --always --dirty 2>/dev/null || echo 'a source tree')" \
    "$(date -R)" | gzip -9n > "$doc/changelog.gz"

for script in postinst prerm postrm; do
    install -m 0755 "packaging/$script" "$root/DEBIAN/$script"
done
install -m 0644 packaging/triggers "$root/DEBIAN/triggers"
echo /etc/agentwarden/config.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" -e "s/@ARCH@/$arch/" packaging/control.in > "$root/DEBIAN/control"
(cd "$root" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' \
    | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"

deb=dist/agentwarden_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "built $deb"
