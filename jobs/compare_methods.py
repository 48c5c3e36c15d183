"""Every method on the embedded default (tune_spaces/methods.yaml) × seeds, and its report.

python jobs/compare_methods.py [--resume DIR] [key=value ...]
ray job submit --working-dir . -- python jobs/compare_methods.py
"""

import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "--space", "tune_spaces/methods.yaml", *sys.argv[1:]]))
