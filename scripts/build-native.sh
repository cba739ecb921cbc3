#!/usr/bin/env bash
# Builds native/punch.node (fallocate's punch-hole, which Node lacks: trims return space) with
# the node-gyp that ships with npm, against the installed Node's headers. Skipped when current.
set -euo pipefail
cd "$(dirname "$0")/../native"
out=build/Release/punch.node
if [ -f "$out" ] && [ "$out" -nt punch.c ] && [ "$out" -nt binding.gyp ]; then exit 0; fi
gyp="$(dirname "$(readlink -f "$(command -v npm)")")/../node_modules/node-gyp/bin/node-gyp.js"
args=(rebuild --loglevel=warn)
# Node's own headers (Debian's and NodeSource's nodejs ship them): no download.
[ -f /usr/include/node/node_api.h ] && args+=(--nodedir=/usr)
echo "setup: building native/punch.node"
node "$gyp" "${args[@]}" >/dev/null
