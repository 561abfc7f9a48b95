#!/bin/bash
# PID 1 of one compute node of the test bed: its own UTS, mount and PID namespace.
#
#   unshare --uts --mount --pid --fork --mount-proc --propagation private \
#       --kill-child node-init.sh NAME SLURM_CONF SHARED_DIR...
#
# Private to the node, as on a real compute node: hostname, /tmp, /run, /var/lib and
# /var/spool (tmpfs), the process tree. Shared with the login node: /home, /opt (the
# config, the apptainer stand-in and the images live under /opt/sbroker-testbed) and the
# SHARED_DIRs given (re-bound over the new tmpfs: the munge socket dir). It starts the
# node's slurmd (which daemonizes; slurmstepds are reparented here) and then only reaps
# orphans. SIGTERM ends it; when PID 1 ends the kernel kills every process of the node and
# its tmpfs mounts vanish, which is what a node failure looks like.
set -eu
name=$1 conf=$2
shift 2

hostname "$name"

# Keep the shared dirs open before tmpfs hides their parents, then re-bind them from the
# fds (--no-canonicalize: the /proc/self/fd link would resolve into the new tmpfs).
fds=()
for dir in "$@"; do
    exec {fd}<"$dir"
    fds+=("$fd:$dir")
done
hosts=$(cat /etc/hosts)

mount -t tmpfs -o mode=1777 tmpfs /tmp
for dir in /run /var/lib /var/spool; do
    mount -t tmpfs -o mode=755 tmpfs "$dir"
done
for entry in "${fds[@]}"; do
    fd=${entry%%:*} dir=${entry#*:}
    mkdir -p "$dir"
    mount --no-canonicalize --bind "/proc/self/fd/$fd" "$dir"
    eval "exec $fd<&-"
done
mkdir -p /run/sshd /var/spool/slurmd /var/lib/slurm
printf '%s\n127.0.0.2 node1\n127.0.0.3 node2\n' "$hosts" > /run/hosts
mount --bind /run/hosts /etc/hosts
# Login shells are the login node's business: forced users' wrapper shell there is bash on
# compute nodes (what a login-node-only sssd override_shell gives; apptainer copies it).
sed -e 's#:[^:]*/sbroker-login$#:/bin/bash#' /etc/passwd > /run/passwd
mount --bind /run/passwd /etc/passwd

SLURM_CONF=$conf slurmd -f "$conf"

trap 'pkill -TERM -x slurmd; sleep 0.5; exit 0' TERM
# PID 1: bash reaps every child it is handed (daemonized slurmstepds, escaped processes).
while :; do
    sleep 1 &
    wait $! || true
done
