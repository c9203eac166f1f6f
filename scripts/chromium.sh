#!/usr/bin/env bash
# Debian's chromium for the HTML report's browser test (driven by Playwright with
# executable_path: no browser download). Idempotent; about 22 s when it installs.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y --no-install-recommends chromium >/dev/null
fi
command -v chromium >/dev/null
