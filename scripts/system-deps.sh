#!/usr/bin/env bash
# System packages the tests use: Chromium (browser test) and PostgreSQL (the labeling app's
# test suite runs on PostgreSQL as well as SQLite). Installed with apt-get when missing and we
# can (root, or passwordless sudo); otherwise those tests skip locally — under CI=true they fail.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  need+=(postgresql)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${need[*]} and no apt-get; those tests will skip (fail under CI)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "system-deps: missing ${need[*]}; install them (apt-get install ${need[*]}) or those tests skip" >&2
    exit 0
  fi
fi
echo "system-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
