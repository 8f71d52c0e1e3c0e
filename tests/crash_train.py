"""Run `python -m motg_fast.train` in this process and SIGKILL it at the N-th call of one write.

    python tests/crash_train.py TARGET N [train flags...]   # N = 0: never kill, count the calls

TARGET is one of the writes a run makes while saving and resuming:
- `save_pretrained`: the model weights of a checkpoint,
- `torch.save`: the trainer state of a checkpoint,
- `os.replace`: every atomic commit (checkpoint folder, config.json, a resumed metrics log),
- `metrics.append`: a metrics line (the kill lands after half of the line is written).
With N = 0 the run finishes and prints `calls: {target: count}` for every target.
"""

import json
import os
import signal
import sys

import torch
from transformers import PreTrainedModel

from motg_fast.cli import run_cli
from motg_fast.train import main
from motg_fast.training import metrics

TARGET, KILL_AT = sys.argv[1], int(sys.argv[2])
CALLS = {"save_pretrained": 0, "torch.save": 0, "os.replace": 0, "metrics.append": 0}


def _counting(name, original, before_kill=None):
    def wrapper(*args, **kwargs):
        CALLS[name] += 1
        if name == TARGET and CALLS[name] == KILL_AT:
            if before_kill is not None:
                before_kill(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    return wrapper


def _half_line(log, record):
    line = json.dumps(record, sort_keys=True) + "\n"
    with log.path.open("a") as handle:
        handle.write(line[: len(line) // 2])
        handle.flush()


PreTrainedModel.save_pretrained = _counting("save_pretrained", PreTrainedModel.save_pretrained)
torch.save = _counting("torch.save", torch.save)
os.replace = _counting("os.replace", os.replace)
metrics.MetricsLog.append = _counting("metrics.append", metrics.MetricsLog.append, _half_line)

code = run_cli(main, sys.argv[3:])
print("calls:", json.dumps(CALLS))
sys.exit(code)
