#!/bin/bash
# Install (or check) host packages that containers borrow read-only: TeX Live, ImageMagick.
# Shipped inside broker.container; run by broker.container.host.install_packages.
#
#   install-host-packages.sh --check                 report what is installed, change nothing
#   install-host-packages.sh [--texlive] [--imagemagick] [--all]   install with apt-get (root)
#
# --all means TeX Live and ImageMagick (nothing else). Exit status: 0 ok, 1 install failed,
# 2 usage error, 3 not root / no apt-get.
set -u

TEXLIVE_PACKAGES="texlive-latex-extra texlive-bibtex-extra texlive-fonts-recommended latexmk latexdiff biber ghostscript poppler-utils"
IMAGEMAGICK_PACKAGES="imagemagick"

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

check() {
    local group=$1; shift
    local found="" missing="" bin
    for bin in "$@"; do
        if command -v "$bin" >/dev/null 2>&1; then found="$found $bin"; else missing="$missing $bin"; fi
    done
    echo "$group: found:${found:- none} missing:${missing:- none}"
}

do_texlive=0 do_imagemagick=0 do_check=0
[ $# -eq 0 ] && { usage; exit 2; }
for arg in "$@"; do
    case $arg in
        --texlive) do_texlive=1 ;;
        --imagemagick) do_imagemagick=1 ;;
        --all) do_texlive=1; do_imagemagick=1 ;;
        --check) do_check=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

if [ "$do_check" = 1 ]; then
    check texlive pdflatex bibtex latexmk latexdiff kpsewhich makeindex biber gs pdfinfo
    check imagemagick convert identify mogrify
    exit 0
fi

if [ "$(id -u)" != 0 ]; then echo "must run as root (use sudo)" >&2; exit 3; fi
if ! command -v apt-get >/dev/null 2>&1; then echo "apt-get not found: Debian/Ubuntu hosts only" >&2; exit 3; fi

packages=""
[ "$do_texlive" = 1 ] && packages="$packages $TEXLIVE_PACKAGES"
[ "$do_imagemagick" = 1 ] && packages="$packages $IMAGEMAGICK_PACKAGES"
export DEBIAN_FRONTEND=noninteractive
echo "+ apt-get install -y --no-install-recommends$packages"
apt-get update && apt-get install -y --no-install-recommends $packages || exit 1
