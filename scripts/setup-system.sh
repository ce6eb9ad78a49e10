#!/usr/bin/env bash
# The system packages the test suite needs, from Debian, installed when this runs as root with apt-get;
# otherwise it names what is missing and the exact command to install it, and exits 1.
#   openssh-server, rsync  tests/deploy/test_ray_up.py: a real `ray up` over SSH to loopback (Ray's file_mounts)
#   chromium               tests/actors/test_serve.py: /dashboard rendered in a headless browser
#   prometheus             tests/actors/test_prometheus.py: a real Prometheus scraping the local cluster
# Used by `make test` (and so by .ci/run). Set LATENTMOE_SKIP_SYSTEM_SETUP=1 to skip the check.
set -euo pipefail
[ "${LATENTMOE_SKIP_SYSTEM_SETUP:-0}" = 1 ] && exit 0

declare -A need=([openssh-server]=/usr/sbin/sshd [rsync]=rsync [chromium]=chromium [prometheus]=prometheus)
missing=()
for pkg in openssh-server rsync chromium prometheus; do
    exe=${need[$pkg]}
    if [[ $exe == /* ]]; then [ -x "$exe" ] || missing+=("$pkg"); else command -v "$exe" >/dev/null || missing+=("$pkg"); fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

cmd="apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ${missing[*]}"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup-system: installing ${missing[*]} (Debian packages the tests need)" >&2
    # policy-rc.d: install the packages without starting their services (the tests start their own)
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; own_policy=1; fi
    trap '[ $own_policy = 1 ] && rm -f "$policy"' EXIT
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    exit 0
fi
echo "setup-system: the tests need these Debian packages: ${missing[*]}. Install them with:" >&2
if command -v apt-get >/dev/null; then echo "    sudo sh -c '$cmd'" >&2; else echo "    (your system's packages for: ${missing[*]})" >&2; fi
echo "or set LATENTMOE_SKIP_SYSTEM_SETUP=1 to run without them (the tests that need them then fail)." >&2
exit 1
