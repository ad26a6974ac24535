#!/usr/bin/env bash
# The test command (README, "Tests"): installs what the tests need when it is missing, then
# runs every test of the workspace.
#
# Needs: the Rust toolchain; python3 (the Python port of sflow_fwd.py is the interoperability
# peer of the --ssh-hex tests); ssh and sshd (openssh-client, openssh-server) for the test
# through a real ssh session, which is skipped with a printed reason where sshd cannot run;
# ip (iproute2) and nft (nftables) for the tests that block UDP inside a network namespace of
# their own (they need root, and are skipped with a printed reason without it).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need+=(iproute2)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need+=(nftables)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "tests/run.sh: installing ${need[*]}" >&2
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/dev/null; then
            echo "tests/run.sh: could not install ${need[*]}; tests that need them will skip or fail" >&2
        fi
    else
        echo "tests/run.sh: missing ${need[*]} (Debian: apt-get install ${need[*]})" >&2
    fi
fi

exec cargo test --workspace --locked "$@"
