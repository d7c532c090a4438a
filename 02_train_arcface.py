"""Stage 02: train the ArcFace embedding model on the crops (CPU, one GPU, or torchrun DDP)."""

from whaleid import train
from whaleid.cli import run_stage


def add_args(p):
    p.add_argument("--resume", action="store_true", help="continue from outputs/02_train/last.pt")


if __name__ == "__main__":
    run_stage(__doc__, lambda cfg, args: train.run(cfg, resume=args.resume), add_args)
