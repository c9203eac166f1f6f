#!/usr/bin/env bash
# Installs what submitting over SSH needs and tests use (an sshd on loopback, rsync on both
# ends), from Debian, when missing: openssh-server (sshd, ssh-keygen, ssh) and rsync.
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail
PKGS=(openssh-server openssh-client rsync)
missing=()
for p in "${PKGS[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == *" installed" ]] \
        || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null && exec sudo -E "$0" "$@"
    echo "ssh_deps: install ${missing[*]} (needs root)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
# Package scripts must not start sshd (no init system here; tests start their own).
made_policy=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
fi
rc=0
apt-get install "${opts[@]}" "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null 2>&1 &&
         apt-get install "${opts[@]}" "${missing[@]}"; } || rc=$?
[[ $made_policy -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
[[ $rc -eq 0 ]] || { echo "ssh_deps: apt-get install ${missing[*]} failed" >&2; exit 1; }
echo "ssh_deps: installed ${missing[*]}"
