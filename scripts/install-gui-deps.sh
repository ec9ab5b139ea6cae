#!/usr/bin/env bash
# The system packages napari's GUI tests need to open windows on a virtual display: Xvfb, xauth and
# Qt's xcb/EGL/fontconfig libraries. Used by `make test` and CI, so the list lives here only.
#
#   bash scripts/install-gui-deps.sh          install what is missing, where this user can
#                                             (root, or sudo without a password, with apt-get)
#   bash scripts/install-gui-deps.sh --print  print the install command for what is missing
#
# Never fails the build: where the packages cannot be installed it says how to install them, and
# the GUI tests are skipped (tests/conftest.py says so too). STLNMF_NO_SYSTEM_INSTALL=1 skips it.
set -u

packages="xvfb xauth libfontconfig1 libegl1 libgl1 libdbus-1-3 libglib2.0-0 libxcb-cursor0 \
libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-render-util0 libxcb-shape0 libxkbcommon-x11-0 \
libxcb-xinerama0"

if [ "$(uname -s)" != "Linux" ]; then
  exit 0  # macOS and Windows have a display server of their own
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
  if ! command -v Xvfb >/dev/null 2>&1; then
    echo "note: the napari GUI tests need Xvfb and Qt's X11 libraries; this is not a Debian/Ubuntu" \
      "system, so install them with your package manager (see scripts/install-gui-deps.sh)."
  fi
  exit 0
fi

missing=""
for p in $packages; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)
  case "$status" in *" installed") ;; *) missing="$missing $p" ;; esac
done
command="apt-get update && apt-get install -y --no-install-recommends$missing"

if [ "${1:-}" = "--print" ]; then
  [ -n "$missing" ] && echo "sudo sh -c '$command'"
  exit 0
fi
[ -z "$missing" ] && exit 0
if [ -n "${STLNMF_NO_SYSTEM_INSTALL:-}" ]; then
  echo "note: STLNMF_NO_SYSTEM_INSTALL is set; the napari GUI tests will be skipped. To run them:" \
    "sudo sh -c '$command'"
  exit 0
fi

if [ "$(id -u)" = "0" ]; then
  run=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  run="sudo -n"
else
  echo "note: the napari GUI tests will be skipped: system packages missing:$missing." \
    "To run them: sudo sh -c '$command'"
  exit 0
fi

echo "Installing the system packages napari's GUI tests need (about 15 s):$missing"
log=$(mktemp)
if ! { DEBIAN_FRONTEND=noninteractive $run apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive $run apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
  tail -n 5 "$log"
  echo "warning: installing them failed (above); the napari GUI tests will be skipped. To run them:" \
    "sudo sh -c '$command'"
fi
rm -f "$log"
exit 0
