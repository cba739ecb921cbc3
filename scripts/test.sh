#!/usr/bin/env bash
# Every check and every test: format, lint, types, then the suite against real clients.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== format"; npx prettier --check . --log-level warn
echo "== lint"; npx eslint .
echo "== types"; npx tsc -p tsconfig.test.json
echo "== tests"
# Node 20's --test takes no globs: the shell lists the files.
exec node --import tsx --test --test-concurrency=1 --test-timeout=600000 test/*.test.ts "$@"
