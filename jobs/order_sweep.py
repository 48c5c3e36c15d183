"""The ranking-order sweep (R = 0 CLIP, 1 RankCLIP, 2..5 high-order PL) × seeds, and its report.

python jobs/order_sweep.py [--resume DIR] [key=value ...]
ray job submit --working-dir . -- python jobs/order_sweep.py grid.seed=[0]
"""

import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "--space", "tune_spaces/order_sweep.yaml", *sys.argv[1:]]))
