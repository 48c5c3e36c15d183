"""The baselines sweep (tune_spaces/baselines.yaml) × seeds, and its report with deltas.

python jobs/baselines.py [--resume DIR] [key=value ...]
ray job submit --working-dir . -- python jobs/baselines.py
"""

import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "--space", "tune_spaces/baselines.yaml", *sys.argv[1:]]))
