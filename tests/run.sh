#!/usr/bin/env bash
# The test command (README, "Tests"): installs what the tests need when it is missing, then
# runs every test of the workspace.
#
# Needs: the Rust toolchain; python3 (the Python port of sflow_fwd.py is the interoperability
# peer of the --ssh-hex tests); ssh and sshd (openssh-client, openssh-server) for the test
# through a real ssh session, which is skipped with a printed reason where sshd cannot run;
# ip (iproute2) and nft (nftables) for the tests that block UDP inside a network namespace of
# their own (they need root, and are skipped with a printed reason without it); prometheus
# and promtool (prometheus) for the tests that have a real Prometheus server scrape the
# binaries' /metrics and lint the expositions (skipped with a printed reason where missing).
#
# Installing starts no service: while apt-get runs, a policy-rc.d that denies every start is
# in place (unless the machine has one of its own, which then decides), and a prometheus
# service this script installed is stopped and disabled afterwards whatever the policy was.
# The tests start their own servers, on ports of their own.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need+=(iproute2)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need+=(nftables)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "tests/run.sh: installing ${need[*]}" >&2
        # invoke-rc.d and deb-systemd-invoke (which maintainer scripts start services with)
        # ask /usr/sbin/policy-rc.d first; exit status 101 means "not allowed".
        policy=/usr/sbin/policy-rc.d
        if [ -e "$policy" ]; then
            policy=
        else
            trap 'rm -f "$policy"' EXIT
            trap 'rm -f "$policy"; exit 130' INT TERM HUP
            printf '#!/bin/sh\n# tests/run.sh: no service starts while it installs packages\nexit 101\n' >"$policy" &&
                chmod 755 "$policy" ||
                echo "tests/run.sh: could not write $policy; services may start" >&2
        fi
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/dev/null; then
            echo "tests/run.sh: could not install ${need[*]}; tests that need them will skip or fail" >&2
        fi
        if [ -n "$policy" ]; then
            rm -f "$policy"
            trap - EXIT INT TERM HUP
        fi
        # In case a policy let the package start its service, and so that no boot does.
        if [[ " ${need[*]} " == *" prometheus "* ]]; then
            if [ -d /run/systemd/system ]; then
                systemctl disable --now prometheus.service >/dev/null 2>&1 || true
            elif [ -x /etc/init.d/prometheus ]; then
                /etc/init.d/prometheus stop >/dev/null 2>&1 || true
                update-rc.d prometheus disable >/dev/null 2>&1 || true
            fi
        fi
    else
        echo "tests/run.sh: missing ${need[*]} (Debian: apt-get install ${need[*]})" >&2
    fi
fi

exec cargo test --workspace --locked "$@"
