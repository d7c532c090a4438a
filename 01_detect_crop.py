"""Stage 01: find the animal in every image (imported boxes, built-in detector or fallback) and cache crops."""

from whaleid import detect
from whaleid.cli import run_stage

if __name__ == "__main__":
    run_stage(__doc__, lambda cfg, args: detect.run(cfg))
