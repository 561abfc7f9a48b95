#!/bin/bash
# The second login node of the test bed: its own UTS and mount namespace.
#
#   unshare --uts --mount --propagation private --fork bash login-init.sh NAME SSHD_CONFIG SSHD_LOG DIR...
#
# Private to it, as on a real second login node: its hostname, and a tmpfs over each DIR
# (the broker's state dir and socket dir), so its broker's /var/lib/sbroker-test and
# /run/sbroker-test really differ from the first login node's. Everything else (/home, /opt,
# SLURM's config, the munge socket, the process tree and the network) is shared, as login
# nodes share home and cluster config. It starts this node's sshd, then waits; the harness
# runs this node's broker and clients inside it with nsenter.
set -eu
name=$1 sshd_config=$2 sshd_log=$3
shift 3

hostname "$name"
for dir in "$@"; do
    mkdir -p "$dir"
    mount -t tmpfs -o mode=755 tmpfs "$dir"
done
/usr/sbin/sshd -f "$sshd_config" -E "$sshd_log"

trap 'exit 0' TERM
while :; do
    sleep 1 &
    wait $! || true
done
