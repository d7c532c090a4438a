"""Stage 04: kNN over the embeddings, insert new_individual, write submission.csv and the visual report."""

from whaleid import submit
from whaleid.cli import run_stage

if __name__ == "__main__":
    run_stage(__doc__, lambda cfg, args: submit.run(cfg))
