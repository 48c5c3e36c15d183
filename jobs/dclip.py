"""DCLIP's ablations (tune_spaces/dclip_ablations.yaml) × seeds: every trial trains the
meta-teacher (phase 1) and then the student (phase 2), two Ray Train runs; the report has
deltas against the full model.

    python jobs/dclip.py [--resume DIR] [key=value ...]
    python jobs/dclip.py grid.variant=[full] grid.seed=[0]      # one DCLIP run, both phases
    ray job submit --working-dir . -- python jobs/dclip.py
"""

import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "--space", "tune_spaces/dclip_ablations.yaml", *sys.argv[1:]]))
