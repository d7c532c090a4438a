"""Stage 00: validate the data (or generate the demo set), fix species, split folds, write the catalogue."""

from whaleid import catalogue
from whaleid.cli import run_stage

if __name__ == "__main__":
    run_stage(__doc__, lambda cfg, args: catalogue.run(cfg))
