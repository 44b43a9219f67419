"""Run by torchrun from tests/test_ddp.py: one rank of a distilled student run with the feature
term on; each rank saves what it ends with, so the test can compare ranks."""
import json
import os
import sys

import torch

from m2skd.train_config import load_config
from m2skd.trainer import train


def main(run_dir: str, config_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(config_path)
    rank = int(os.environ["RANK"])

    def save(student):
        torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, f"{out_dir}/rank{rank}.pt")

    result = train(run_dir, "student", cfg, name="ddp", overwrite=True, device="cpu", on_finish=save)
    if rank == 0:
        with open(f"{out_dir}/result.json", "w") as fh:
            json.dump({k: result[k] for k in ("world_size", "steps_done", "history", "checkpoint")}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
