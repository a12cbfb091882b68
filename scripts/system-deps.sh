#!/usr/bin/env bash
# Install the Debian packages the test suite needs (an X server for napari's GUI tests; a
# TeX engine and poppler for report.pdf and the LaTeX-table and PDF tests), when they are
# missing and we are root. Idempotent; prints what it does. Slurm is set up
# by scripts/start-slurm.sh.
set -euo pipefail
pkgs="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0
      libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1
      libfontconfig1 libdbus-1-3
      texlive-latex-base texlive-latex-recommended texlive-fonts-recommended poppler-utils"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing Debian packages:$missing (install them as root; GUI tests will be skipped)" >&2
  exit 0
fi
echo "system-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/tmp/cellbg-apt.log 2>&1
apt-get install -y -q --no-install-recommends $missing >>/tmp/cellbg-apt.log 2>&1 \
  || { tail -n 20 /tmp/cellbg-apt.log; echo "system-deps: apt-get install failed" >&2; exit 1; }
