#!/usr/bin/env bash
# Install the system programs the tests use, when missing: redis-server, Chromium
# (with its driver), nginx, HAProxy, openssl, PostgreSQL, Node.js and ss (iproute2). As root on Debian/Ubuntu this uses apt-get;
# elsewhere it prints what to install and the tests that need it are skipped.
set -u
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
{ command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "${CHROMIUM:-}" ]; } || need+=(chromium chromium-driver)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)  # the Node tests' packages (tests/js/package-lock.json)
command -v ss >/dev/null 2>&1 || need+=(iproute2)  # the listen backlog's test reads it
# Emoji in the browser tests' screenshots (reactions), instead of empty boxes.
[ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || {
    echo "apt-get install ${need[*]} failed" >&2; exit 1; }
else
  echo "missing system packages; install them with: sudo apt-get install ${need[*]}  (tests that need them are skipped)"
fi
