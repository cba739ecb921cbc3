#!/usr/bin/env bash
# Builds native/punch.node (fallocate's punch-hole, which Node lacks: trims return space) and
# native/xts.node (AES-XTS for encrypted volumes without a key schedule per sector) with the
# node-gyp that ships with npm, against the installed Node's headers. Skipped when current.
set -euo pipefail
cd "$(dirname "$0")/../native"
current=1
for name in punch xts; do
  out=build/Release/$name.node
  [ -f "$out" ] && [ "$out" -nt $name.c ] && [ "$out" -nt binding.gyp ] || current=0
done
[ $current = 1 ] && exit 0
gyp="$(dirname "$(readlink -f "$(command -v npm)")")/../node_modules/node-gyp/bin/node-gyp.js"
args=(rebuild --loglevel=warn)
# Node's own headers (Debian's and NodeSource's nodejs ship them): no download.
[ -f /usr/include/node/node_api.h ] && args+=(--nodedir=/usr)
echo "setup: building native/punch.node and native/xts.node"
node "$gyp" "${args[@]}" >/dev/null
