"""Run under torchrun by test_distributed.py: trains the TrainConfig given as JSON (fastssl.train's setup and loop,
as `fastssl train` runs them), then saves this rank's queue, which the test compares across ranks."""

import json
import sys

import torch

from fastssl import dist
from fastssl.config import settings
from fastssl.train import loop, setup

cfg = settings(**json.loads(sys.argv[1]))
run = setup(cfg)
try:
    loop(run)
    run.logger.close()
    torch.save(run.method.queue.rows, f"{cfg.out}/queue-rank{dist.rank()}.pt")
finally:
    dist.destroy()
