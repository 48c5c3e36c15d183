"""Rank candidate frozen image/text encoder pairs by linear CKA on paired data (freeze-align).

    python jobs/select_encoders.py --image vits16=vits16 --image mine=/models/dinov3-vitl16 \\
        --text minilm=default --text mpnet=/models/all-mpnet-base-v2 [--n 1000] [key=value ...]

--image NAME=SIZE|DIR: a DINOv3 of a named size (random weights) or a local checkpoint
directory; --text NAME=default|DIR: the shipped all-MiniLM-L6-v2 or a local sentence encoder.
Overrides (data.path=..., data.image_size=...) choose the pairs; the default is the embedded set.
"""

import argparse
import sys
from pathlib import Path

from raytrain.cli import reported
from raytrain.config import ConfigError, DINOv3Config, TextTeacherConfig, make_config
from raytrain.eval.select import encoder_table
from raytrain.log import log
from raytrain.teachers.dinov3 import VIT_SIZES


def candidates(specs: list[str], kind: str) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"--{kind} {spec!r}: expected NAME=VALUE")
        out[name] = value
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", action="append", default=[], help="NAME=SIZE|DIR (repeatable)")
    p.add_argument("--text", action="append", default=[], help="NAME=default|DIR (repeatable)")
    p.add_argument("--n", type=int, default=1000, help="image-caption pairs")
    p.add_argument("--out", default="results/select_encoders.csv")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    def run():
        cfg = make_config({}, args.overrides)
        size = cfg.teachers.dinov3.image_size
        images = {
            n: DINOv3Config(size=v, image_size=size) if v in VIT_SIZES else DINOv3Config(path=v, image_size=size)
            for n, v in (candidates(args.image, "image") or {"tiny": "tiny"}).items()
        }
        texts = {
            n: TextTeacherConfig(path=None if v == "default" else v)
            for n, v in (candidates(args.text, "text") or {"minilm": "default"}).items()
        }
        table = encoder_table(cfg.data, images, texts, args.n)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print("| image encoder | text encoder | CKA |\n|---|---|---|")
        for row in table.itertuples():
            print(f"| {row.image_encoder} | {row.text_encoder} | {row.cka:.4f} |")
        log.info(f"table written to {args.out}")

    return reported(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
