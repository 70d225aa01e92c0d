#!/usr/bin/env bash
# Installs the Debian packages Tandem HA and its tests use, when run as root on a
# Debian-like system; elsewhere it only says what is missing.
set -euo pipefail
pkgs=(python3-venv iproute2 nftables iputils-arping procps psmisc fuse3 util-linux stress-ng postgresql)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# python3-venv is only needed when the interpreter cannot make a venv by itself.
if python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null; then
  missing=("${missing[@]/python3-venv}")
fi
read -r -a missing <<<"${missing[*]:-}"
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "note: missing system packages (install them as root): ${missing[*]}" >&2
fi
