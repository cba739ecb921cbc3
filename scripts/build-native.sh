#!/usr/bin/env bash
# Builds native/punch.node (fallocate's punch-hole, which Node lacks: trims return space),
# native/xts.node (AES-XTS for encrypted volumes without a key schedule per sector) and
# native/xxh32.node (block checksums hashed where the bytes lie, no copy into WebAssembly) with
# the node-gyp that ships with npm, against the installed Node's headers. Skipped when current.
set -euo pipefail
cd "$(dirname "$0")/../native"
current=1
for name in punch xts xxh32; do
  out=build/Release/$name.node
  [ -f "$out" ] && [ "$out" -nt $name.c ] && [ "$out" -nt binding.gyp ] || current=0
done
[ $current = 1 ] && exit 0
gyp="$(dirname "$(readlink -f "$(command -v npm)")")/../node_modules/node-gyp/bin/node-gyp.js"
args=(rebuild --loglevel=warn)
# Node's own headers (Debian's and NodeSource's nodejs ship them): no download.
[ -f /usr/include/node/node_api.h ] && args+=(--nodedir=/usr)
echo "setup: building native/punch.node, native/xts.node and native/xxh32.node"
node "$gyp" "${args[@]}" >/dev/null
