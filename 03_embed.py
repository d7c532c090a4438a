"""Stage 03: embed every train (gallery) and test crop with the trained model, flip TTA included."""

from whaleid import embed
from whaleid.cli import run_stage

if __name__ == "__main__":
    run_stage(__doc__, lambda cfg, args: embed.run(cfg))
