#!/usr/bin/env bash
# Builds CPython from Debian's source package into a cache folder, and prints
# the path of its interpreter: `python-from-source.sh` for the GIL build,
# `python-from-source.sh --free-threaded` for the one without the GIL
# (--disable-gil, "3.13t"), so that the two are measured version to version.
# A cached build is reused. The machine's apt configuration is left as it
# was: the source list and its package lists live in a temporary folder used
# for this one download. For a newer CPython, change the two lines below.
set -euo pipefail

VERSION=3.13
SUITE=trixie

FREE_THREADED=0
[ "${1:-}" = "--free-threaded" ] && FREE_THREADED=1
NAME=python$VERSION
[ $FREE_THREADED = 1 ] && NAME=python${VERSION}t
CACHE=${SHARDLOOP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shardloop}
PREFIX=$CACHE/$NAME
PYTHON=$PREFIX/bin/$NAME
if [ $FREE_THREADED = 1 ]; then
    CHECK='import sys; assert not sys._is_gil_enabled(), "the GIL is on"'
    CONFIGURE_GIL=--disable-gil
else
    CHECK='import sys; assert getattr(sys, "_is_gil_enabled", lambda: True)(), "no GIL"'
    CONFIGURE_GIL=
fi
if [ -x "$PYTHON" ] && "$PYTHON" -c "$CHECK" 2>/dev/null; then
    echo "$PYTHON"
    exit 0
fi

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
log() { echo "python-from-source: $*" >&2; }

log "installing build dependencies"
$SUDO apt-get install -y -qq build-essential dpkg-dev pkg-config libssl-dev zlib1g-dev \
    libbz2-dev libffi-dev liblzma-dev libsqlite3-dev libreadline-dev uuid-dev >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq build-essential dpkg-dev \
         pkg-config libssl-dev zlib1g-dev libbz2-dev libffi-dev liblzma-dev libsqlite3-dev \
         libreadline-dev uuid-dev >/dev/null; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/parts" "$work/src"
cat > "$work/$SUITE.sources" <<SOURCES
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
cp "$work/$SUITE.sources" "$work/parts/"
APT_OPTS=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/parts"
          -o "Dir::State::Lists=$work/lists" -o "Debug::NoLocking=1")

log "fetching the $NAME source package from $SUITE"
apt-get "${APT_OPTS[@]}" update -qq >/dev/null 2>&1
(cd "$work/src" && apt-get "${APT_OPTS[@]}" source --download-only -qq "python$VERSION" >/dev/null 2>&1)
# The upstream tarball, without Debian's patches (which, among others,
# disable ensurepip and change the install layout).
orig=$(find "$work/src" -maxdepth 1 -name "python${VERSION}_*.orig.tar.*" ! -name '*.asc' | head -n 1)
[ -n "$orig" ] || { log "no python$VERSION source came down"; exit 1; }
tar -xf "$orig" -C "$work/src"
srcdir=$(find "$work/src" -maxdepth 1 -mindepth 1 -type d -name "Python-$VERSION*" | head -n 1)
[ -n "$srcdir" ] || { log "the source tarball has no Python-$VERSION folder"; exit 1; }

log "building $(basename "$srcdir") ${CONFIGURE_GIL:-with the GIL} into $PREFIX (a few minutes)"
build=$work/build
mkdir -p "$build"
mkdir -p "$CACHE"
buildlog=$CACHE/$NAME-build.log
if ! { (cd "$build" && "$srcdir/configure" --prefix="$PREFIX" $CONFIGURE_GIL \
            --with-ensurepip=install --enable-shared LDFLAGS="-Wl,-rpath,$PREFIX/lib") \
        && make -C "$build" -j"$(nproc)" && make -C "$build" install; } >"$buildlog" 2>&1; then
    tail -n 30 "$buildlog" >&2
    log "the build failed; the whole log is $buildlog"
    exit 1
fi
"$PYTHON" -c "$CHECK"
echo "$PYTHON"
