#!/usr/bin/env bash
# Installs what Corral and its tests need on Debian 12, then builds.
# Idempotent: quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(libnbd-bin qemu-utils fio nbdkit nbd-client fuse3 e2fsprogs util-linux iptables etcd-server
  openssl ca-certificates curl chromium make g++ python3)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi

bash scripts/build-native.sh
npx tsc -p tsconfig.json
