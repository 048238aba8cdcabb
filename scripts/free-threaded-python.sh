#!/usr/bin/env bash
# Builds CPython 3.13 without the GIL (--disable-gil, "3.13t") from Debian
# trixie's python3.13 source package into a cache folder, and prints the path
# of its interpreter. A cached build is reused. The machine's apt
# configuration is left as it was: the trixie source list and its package
# lists live in a temporary folder used for this one download.
set -euo pipefail

CACHE=${SHARDLOOP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shardloop}
PREFIX=$CACHE/python3.13t
PYTHON=$PREFIX/bin/python3.13t
if [ -x "$PYTHON" ] && "$PYTHON" -c 'import sys; assert not sys._is_gil_enabled()' 2>/dev/null; then
    echo "$PYTHON"
    exit 0
fi

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
log() { echo "free-threaded-python: $*" >&2; }

log "installing build dependencies"
$SUDO apt-get install -y -qq build-essential dpkg-dev pkg-config libssl-dev zlib1g-dev \
    libbz2-dev libffi-dev liblzma-dev libsqlite3-dev libreadline-dev uuid-dev >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq build-essential dpkg-dev \
         pkg-config libssl-dev zlib1g-dev libbz2-dev libffi-dev liblzma-dev libsqlite3-dev \
         libreadline-dev uuid-dev >/dev/null; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/parts" "$work/src"
cat > "$work/trixie.sources" <<SOURCES
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
cp "$work/trixie.sources" "$work/parts/"
APT_OPTS=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/parts"
          -o "Dir::State::Lists=$work/lists" -o "Debug::NoLocking=1")

log "fetching the python3.13 source package from trixie"
apt-get "${APT_OPTS[@]}" update -qq >/dev/null 2>&1
(cd "$work/src" && apt-get "${APT_OPTS[@]}" source --download-only -qq python3.13 >/dev/null 2>&1)
# The upstream tarball, without Debian's patches (which, among others,
# disable ensurepip and change the install layout).
orig=$(find "$work/src" -maxdepth 1 -name 'python3.13_*.orig.tar.*' ! -name '*.asc' | head -n 1)
[ -n "$orig" ] || { log "no python3.13 source came down"; exit 1; }
tar -xf "$orig" -C "$work/src"
srcdir=$(find "$work/src" -maxdepth 1 -mindepth 1 -type d -name 'Python-3.13*' | head -n 1)
[ -n "$srcdir" ] || { log "the source tarball has no Python-3.13 folder"; exit 1; }

log "building $(basename "$srcdir") with --disable-gil into $PREFIX (a few minutes)"
build=$work/build
mkdir -p "$build"
mkdir -p "$CACHE"
buildlog=$CACHE/python3.13t-build.log
if ! { (cd "$build" && "$srcdir/configure" --prefix="$PREFIX" --disable-gil \
            --with-ensurepip=install --enable-shared LDFLAGS="-Wl,-rpath,$PREFIX/lib") \
        && make -C "$build" -j"$(nproc)" && make -C "$build" install; } >"$buildlog" 2>&1; then
    tail -n 30 "$buildlog" >&2
    log "the build failed; the whole log is $buildlog"
    exit 1
fi
"$PYTHON" -c 'import sys; assert not sys._is_gil_enabled(), "the GIL is on"'
echo "$PYTHON"
