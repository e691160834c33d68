#!/bin/bash
# One node's share of a dsgrow job: started once per node by pretrain.sbatch through
#   srun --ntasks-per-node=1 bash launchers/slurm/node.sh PRETRAIN_ARGS...
# Node rank = SLURM_PROCID (one task per node). Everything else comes from pretrain.sbatch:
#   DSGROW_PY DSGROW_HOME DSGROW_NODE_LAUNCHER (torchrun|deepspeed) DSGROW_NNODES DSGROW_NODE_NPROC
#   DSGROW_HOSTFILE DSGROW_LOGDIR MASTER_ADDR MASTER_PORT
# The launcher on each node starts DSGROW_NODE_NPROC ranks; global rank = node rank x nproc + local.
set -euo pipefail

: "${SLURM_PROCID:?node.sh runs under srun (SLURM_PROCID is unset)}"
NODE_RANK=$SLURM_PROCID
log="$DSGROW_LOGDIR/job${SLURM_JOB_ID:-0}.node${NODE_RANK}.log"
# This node's output goes to its own log on shared storage and on to srun (the job's --output).
# The launcher runs as a child, not exec'd, so that tee can be waited for: slurmstepd ends what is
# left of a task when its main process exits, which would cut the end of the log.
exec > >(tee -a "$log") 2>&1
tee_pid=$!
echo "[dsgrow-slurm] node $NODE_RANK/$DSGROW_NNODES on $(hostname): $DSGROW_NODE_LAUNCHER," \
     "$DSGROW_NODE_NPROC rank(s), master $MASTER_ADDR:$MASTER_PORT"

script="$DSGROW_HOME/launchers/pretrain.py"
rc=0
case "$DSGROW_NODE_LAUNCHER" in
  torchrun)
    # Static rendezvous: node K's ranks are K*nproc .. K*nproc+nproc-1, and node 0 (the first host
    # of the allocation, MASTER_ADDR) hosts the store. No restarts: a failed rank ends the job and
    # a requeue resumes it from the last checkpoint.
    "$DSGROW_PY" -m torch.distributed.run --nnodes "$DSGROW_NNODES" --node_rank "$NODE_RANK" \
      --nproc_per_node "$DSGROW_NODE_NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
      --max_restarts 0 "$script" "$@" || rc=$?
    ;;
  deepspeed)
    # DeepSpeed's launcher without ssh: each node starts its own slots of the shared hostfile.
    "$DSGROW_PY" -m deepspeed.launcher.runner --hostfile "$DSGROW_HOSTFILE" --no_ssh \
      --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$script" "$@" || rc=$?
    ;;
  *)
    echo "dsgrow: error: DSGROW_NODE_LAUNCHER must be torchrun or deepspeed" >&2
    rc=2
    ;;
esac
exec >&- 2>&-                            # tee sees the end of its input ...
wait "$tee_pid" || true                  # ... and has written everything
exit "$rc"
