"""freeze-align's toy study (appendix A.4): CKA between two random non-linear views of a
shared latent vs the minimum CLIP loss their linear projections reach; writes JSON + plot.

    python jobs/cka_toy_study.py [--instances 1000] [--steps 500] [--lr 3e-4] [--seed 0] [--out results/cka_toy]
"""

import argparse
import json
from pathlib import Path

from raytrain.eval.cka_toy import plot, run

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--n", type=int, default=32, help="vectors per instance")
    p.add_argument("--d", type=int, default=16, help="dimensions")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/cka_toy")
    args = p.parse_args()
    result = run(args.instances, args.n, args.d, steps=args.steps, lr=args.lr, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cka_toy.json").write_text(json.dumps(result))
    plot(result, out / "cka_vs_clip_loss.png")
    print(
        f"{args.instances} instances: Pearson r(CKA, log min CLIP loss) = {result['pearson_cka_log_loss']:.3f}, "
        f"Spearman = {result['spearman_cka_loss']:.3f}; plot {out / 'cka_vs_clip_loss.png'}"
    )
