#!/usr/bin/env bash
# System packages the test suite drives for real: Chromium (the Gradio demo's browser test),
# Prometheus (the scrape test) and PostgreSQL (store contention). Installs only what is missing,
# from Debian's packages, when it can (root + apt-get); otherwise says what is missing and the
# tests that need it skip with that reason.
set -uo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
{ command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; } || need+=(postgresql)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: installing ${need[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need[@]}" >/dev/null
else
    echo "system-deps: missing ${need[*]}; install them (e.g. apt-get install ${need[*]}) or the tests that need them skip"
fi
exit 0
