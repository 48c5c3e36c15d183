"""Score a trial checkpoint or an exported student on the evaluation suite (eval.tasks):
one JSON per task in clip_benchmark's layout, and summary.md.

    python jobs/evaluate.py [--config FILE] [--out DIR] [--parallel] <model dir> [key=value ...]
    ray job submit --working-dir . -- python jobs/evaluate.py --config suite.yaml --parallel ckpt/
"""

import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
