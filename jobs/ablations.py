"""The ablations sweep (tune_spaces/ablations.yaml) × seeds, and its report with deltas.

python jobs/ablations.py [--resume DIR] [key=value ...]
ray job submit --working-dir . -- python jobs/ablations.py
"""

import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "--space", "tune_spaces/ablations.yaml", *sys.argv[1:]]))
