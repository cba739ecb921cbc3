#!/usr/bin/env bash
# Quick start: install, build, and run the daemon on the embedded defaults
# (LevelDB and layer files under the data dir) with a ready 1 GiB volume "demo".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec node bin/corral.js daemon --ensure-volume demo=1G "$@"
