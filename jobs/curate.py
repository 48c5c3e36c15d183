"""Concept-balanced curation (freeze-align §4.2, raytrain.data.curation): at most --cap rows per
concept, the rarest concepts first, from a dataset in raytrain's layout into a new one to train
on with data.path=OUT; counts per concept before/after in OUT/curation.json.

    python jobs/curate.py --out /data/curated [--concepts FILE] [--cap 2000] [--seed 0] [data.path=...]
    ray job submit --working-dir . -- python jobs/curate.py --out s3://bucket/curated --concepts concepts.txt data.path=s3://bucket/pool

--concepts: a text file (one concept per line, # comments) or a YAML list; without it, the
embedded default's own concepts (colours, shapes, sizes, textures, backgrounds, classes).
"""

import argparse
import sys

from raytrain.cli import reported
from raytrain.config import make_config
from raytrain.data.curation import curate, default_concepts, load_concepts


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the curated dataset's directory (local or s3://), new")
    p.add_argument("--concepts", help="concept list: .txt (one per line) or .yaml (a list)")
    p.add_argument("--cap", type=int, default=2000, help="rows per concept (the paper: 2,000)")
    p.add_argument("--seed", type=int, default=0, help="which rows a capped concept takes")
    p.add_argument("overrides", nargs="*", help="data.* overrides choosing the source (data.path=...)")
    args = p.parse_args(argv)

    def run():
        data = make_config({}, args.overrides).data
        concepts = load_concepts(args.concepts) if args.concepts else default_concepts(data)
        curate(data, args.out, concepts, args.cap, args.seed)

    return reported(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
