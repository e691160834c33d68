#!/usr/bin/env python
"""DeepSpeed entry point.

    deepspeed launchers/pretrain.py --ds_config ds_configs/zero2.json [--recipe recipes/X.yaml]
        [--set train.lr=3e-4 ...] [--out runs/x] [--resume]

Also runs as a single process (`python launchers/pretrain.py ...`) and under torchrun/srun;
accepts the `--local_rank` argument the deepspeed launcher appends.
"""
import os
import sys

# Run from a source checkout without installing: put the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsgrow.engine.runtime import end_distributed  # noqa: E402
from dsgrow.launch import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    # This process is ours and about to exit: leave the group now, not in interpreter teardown (see
    # end_distributed); after a failure a peer may be gone, so no barrier then.
    end_distributed(wait=code == 0)
    sys.exit(code)
