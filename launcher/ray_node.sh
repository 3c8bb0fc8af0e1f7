#!/usr/bin/env bash
# One node of a ctvlp job's Ray cluster, or a chore on the job's processes of this node.
# The sbatch script of `ctvlp launch slurm` runs it once per node (srun), and
# `ctvlp launch ray-local` runs it N times on one host.
#
#   ray_node.sh head   INDEX   ray start --head --block (its death ends the job's cluster)
#   ray_node.sh worker INDEX   ray start --block --address HEAD; restarted whenever it dies
#                              (a lost node comes back, Ray Train restarts from the last checkpoint)
#   ray_node.sh run CMD...     run CMD tagged as this job's (torchrun's workers, so that `signal` finds them)
#   ray_node.sh signal SIG PATTERN   send SIG to this job's processes whose command line has PATTERN
#   ray_node.sh reap           kill every process of this job on this node, remove its Ray temp folder
#
# From the environment: CTVLP_JOB_KEY (the processes that head, worker and run start carry it as
# CTVLP_JOB_TAG in their environment, so `reap` finds them all and nothing of another job or user;
# the callers themselves, srun and the batch shell, do not carry the tag), CTVLP_JOB_DIR (a `stop` file there ends the
# restart loops), CTVLP_RAY_PORT (the job's first port), CTVLP_RAY_HEAD_IP, CTVLP_RAY_TMP,
# CTVLP_RAY_CPUS / CTVLP_RAY_GPUS (empty: Ray's detection), CTVLP_NODE_IP (default: this node's
# address from `getent hosts $SLURMD_NODENAME`). RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH
# come from the caller: every node of the job uses the job's token.
set -u

job_pids() {  # this job's processes here, except this shell and its parents
    local p pid skip=" $$ $PPID "
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        case "$skip" in *" $pid "*) continue ;; esac
        if { tr '\0' '\n' < "$p/environ"; } 2>/dev/null | grep -qxF "CTVLP_JOB_TAG=$CTVLP_JOB_KEY"; then
            echo "$pid"
        fi
    done
}

node_ip() {
    if [ -n "${CTVLP_NODE_IP:-}" ]; then echo "$CTVLP_NODE_IP"; return; fi
    getent hosts "${SLURMD_NODENAME:-$(hostname)}" | awk '{print $1; exit}'
}

role=$1
case "$role" in
    signal)
        for pid in $(job_pids); do
            if { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$3"; then kill -s "$2" "$pid" 2>/dev/null; fi
        done
        exit 0 ;;
    reap)
        for attempt in 1 2 3; do
            pids=$(job_pids)
            [ -z "$pids" ] && break
            kill -9 $pids 2>/dev/null
            sleep 0.5
        done
        rm -rf -- "$CTVLP_RAY_TMP"
        exit 0 ;;
    run)
        shift
        export CTVLP_JOB_TAG="$CTVLP_JOB_KEY"
        exec "$@" ;;
    head|worker) ;;
    *) echo "ray_node.sh: unknown role $role (head, worker, run, signal, reap)" >&2; exit 2 ;;
esac

index=$2
ip=$(node_ip)
if [ -z "$ip" ]; then
    echo "ray_node.sh: no address for node ${SLURMD_NODENAME:-$(hostname)} (getent hosts): check the node's name resolution" >&2
    exit 1
fi
base=$CTVLP_RAY_PORT
i=$((index % 20))  # several logical nodes may share a host: each gets ports of its own
args=(--block --node-ip-address="$ip" --temp-dir="$CTVLP_RAY_TMP/$index"
      --node-manager-port=$((base + 10 + 10 * i)) --object-manager-port=$((base + 11 + 10 * i))
      --runtime-env-agent-port=$((base + 12 + 10 * i)) --dashboard-agent-grpc-port=$((base + 13 + 10 * i))
      --dashboard-agent-listen-port=$((base + 14 + 10 * i)) --metrics-export-port=$((base + 15 + 10 * i))
      --min-worker-port=$((base + 200 + 40 * i)) --max-worker-port=$((base + 239 + 40 * i)))
[ -n "${CTVLP_RAY_CPUS:-}" ] && args+=(--num-cpus="$CTVLP_RAY_CPUS")
[ -n "${CTVLP_RAY_GPUS:-}" ] && args+=(--num-gpus="$CTVLP_RAY_GPUS")
if [ "$role" = head ]; then
    args+=(--head --port="$base" --ray-client-server-port=$((base + 1)) --dashboard-port=$((base + 2)) --include-dashboard=false)
else
    args+=(--address="$CTVLP_RAY_HEAD_IP:$base")
fi

mkdir -p "$CTVLP_RAY_TMP"
export CTVLP_JOB_TAG="$CTVLP_JOB_KEY"
while :; do
    echo "[ray_node] $role $index (${SLURMD_NODENAME:-$(hostname)}, $ip): ray start" >&2
    ray start "${args[@]}" >> "$CTVLP_JOB_DIR/ray-node-$index.log" 2>&1
    rc=$?
    [ -e "$CTVLP_JOB_DIR/stop" ] && exit 0
    if [ "$role" = head ]; then
        echo "[ray_node] the head's Ray exited (rc=$rc): the job's cluster is gone; see $CTVLP_JOB_DIR/ray-node-$index.log" >&2
        exit 1
    fi
    echo "[ray_node] node $index's Ray exited (rc=$rc): restarting it" >&2
    sleep 2
done
