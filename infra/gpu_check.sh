#!/usr/bin/env bash
# The GPU acceptance run: one script, run once on a freshly started GPU machine without network
# (≤ 8 min on one H100; every stage under its own timeout, so one hang cannot eat the rest).
#
#   bash infra/gpu_check.sh [OUT]            every stage; results in OUT (default $OUT, else results/gpu_check)
#   bash infra/gpu_check.sh --dry-run [OUT]  the same script end to end on a CPU machine: each stage in a
#                                            tiny CPU form, or its command validated and printed
#   bash infra/gpu_check.sh --prepare        on a machine with network: download into .whl/ the wheels the GPU
#                                            machine lacks (and build DeepSpeed's), print their sizes
#
# Stages: env (versions; wheels from .whl*/ installed into /tmp/raytrain-site, nothing else is
# installed), cuda_tests (pytest -m cuda), bench_eager (the paper-scale benchmark in bf16, with the
# ranking objective's cost up to batch 4096), bench_compiled (the same cases through torch.compile),
# teacher (teacher-cache build vs the teacher's forward alone: DINOv3 ViT-B/16, random weights,
# 224 px), sweep (a two-trial order sweep on the GPU through `ray job submit`, infra/quickstart.sh).
# nvidia-smi samples GPU utilisation and memory every 0.5 s during each stage. Results:
# OUT/gpu_check.json and OUT/gpu_check.md, each stage's log and outputs in OUT/<stage>/.
# A stage whose needs are missing (Ray is not importable: its wheel alone is ~79 MB, over one
# 64 MiB transfer) is recorded as skipped with the reason; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
mode=run
case "${1:-}" in
--dry-run) mode=dry; shift ;;
--prepare) mode=prepare; shift ;;
esac
say() { echo "gpu_check: $*"; }

# ---------------------------------------------------------------------------------------------
# --prepare: the wheels. The GPU machine has Python 3.12 with torch, transformers, pyarrow, scipy,
# pandas, numpy, pillow, tqdm, safetensors, sentence-transformers, timm and tensorboard (so also
# grpcio, protobuf, requests, pyyaml, packaging, filelock, fsspec). .whl/ gets what every stage
# needs (pydantic for the config, pytest, DeepSpeed and its dependencies); .whl-ray/ what the Ray
# stages need on top (Ray, its job server's dependencies, matplotlib for the sweep's report).
CORE_WHEELS="pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.7.0 typing-inspection==0.4.5
typing_extensions==4.16.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 hjson==3.1.0
ninja==1.13.2 py-cpuinfo==9.0.0 msgpack==1.2.4 einops==0.8.2 psutil==7.2.2"
RAY_WHEELS="ray==2.60.0 click==8.5.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
rpds-py==2026.9.1 attrs==26.1.0 aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0
multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 aiohttp-cors==0.8.1 colorful==0.5.8 opencensus==0.11.4
opencensus-context==0.1.3 google-api-core==2.44.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0
google-auth==2.63.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 rsa==4.9.1 cachetools==6.2.1 py-spy==0.4.3
opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-prometheus==0.66b2 importlib-metadata==8.7.0
zipp==3.23.0 prometheus_client==0.26.0 smart_open==9.0.4 wrapt==2.5.2 virtualenv==21.15.14 distlib==0.4.4
platformdirs==4.14.9 tensorboardX==2.6.5 matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0
kiwisolver==1.5.1 pyparsing==3.3.3"
if [ "$mode" = prepare ]; then
  py=python3
  [ -x .venv/bin/python ] && py=.venv/bin/python # has torch, which DeepSpeed's build imports
  fetch() { # directory, specs...
    local dir=$1
    shift
    mkdir -p "$dir"
    for spec in "$@"; do
      ls "$dir" | grep -qi "^$(echo "${spec%%==*}" | tr - _)-${spec##*==}-" && continue
      "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$dir" "$spec" || { say "error: could not download $spec" >&2; return 1; }
    done
  }
  # shellcheck disable=SC2086
  fetch .whl $CORE_WHEELS || exit 1
  if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then # DeepSpeed publishes only an sdist
    "$py" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl ||
      { say "error: could not build the DeepSpeed wheel" >&2; exit 1; }
  fi
  case "$(ls .whl/deepspeed-0.19.8-*.whl)" in
  *-py3-none-any.whl) ;;
  *) say "error: the DeepSpeed wheel is not pure Python: $(ls .whl/deepspeed-*.whl)" >&2; exit 1 ;;
  esac
  # shellcheck disable=SC2086
  fetch .whl-ray $RAY_WHEELS || exit 1
  exclude=$(git rev-parse --git-path info/exclude 2>/dev/null) && # git ignores the wheels (worktrees too)
    { grep -qxF '/.whl*' "$exclude" 2>/dev/null || { mkdir -p "$(dirname "$exclude")" && echo '/.whl*' >>"$exclude"; }; }
  repo_mib=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1f", $1 / 2^20}')
  core=$(du -cb .whl/*.whl | tail -1 | awk '{printf "%.1f", $1 / 2^20}')
  ray=$(du -cb .whl-ray/*.whl | tail -1 | awk '{printf "%.1f", $1 / 2^20}')
  biggest=$(ls -S .whl-ray/*.whl | head -1)
  say "repository (tracked files): $repo_mib MiB"
  say ".whl/     $(ls .whl/*.whl | wc -l) wheels, $core MiB (every stage)"
  say ".whl-ray/ $(ls .whl-ray/*.whl | wc -l) wheels, $ray MiB (the Ray stages; largest: $(basename "$biggest"), $(du -b "$biggest" | awk '{printf "%.1f", $1 / 2^20}') MiB)"
  say "one transfer holds 64 MiB: carry .whl (repository + $core MiB); .whl-ray does not fit beside it, so the"
  say "sweep stage is skipped unless the Ray wheels reach the machine another way (they install from any .whl*/ folder)"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
out=${1:-${OUT:-results/gpu_check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=$PWD/.venv/bin/python
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# stage → timeout (s); together ≤ 8 min
declare -A LIMIT=([env]=20 [cuda_tests]=60 [bench_eager]=90 [bench_compiled]=120 [teacher]=40 [sweep]=150)
if [ "$mode" = dry ]; then
  say "dry run on $(hostname): tiny CPU stages, commands validated; results in $out"
  LIMIT=([env]=60 [cuda_tests]=120 [bench_eager]=300 [bench_compiled]=120 [teacher]=180 [sweep]=120)
fi
smi=$(command -v nvidia-smi || true)

record() { # stage status seconds command [reason]
  "$PY" - "$out/$1/status.json" "$@" <<'EOF'
import json, sys
path, stage, status, seconds, command, *reason = sys.argv[1:]
json.dump({"stage": stage, "status": status, "seconds": float(seconds), "command": command,
           "reason": reason[0] if reason and reason[0] else None}, open(path, "w"))
EOF
}

# stage NAME COMMAND: run COMMAND (bash, with STAGE_OUT=OUT/NAME) under the stage's timeout (its
# whole process group is signalled), output in OUT/NAME/log.txt, GPU utilisation sampled beside it
stage() {
  local name=$1 cmd=$2 limit=${LIMIT[$1]} start rc status reason= sampler=
  mkdir -p "$out/$name"
  say "stage $name (timeout ${limit} s): $cmd"
  if [ -n "$smi" ] && [ "$mode" = run ]; then
    "$smi" --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
      >"$out/$name/nvidia-smi.csv" 2>/dev/null &
    sampler=$!
  fi
  start=$(date +%s%N)
  STAGE_OUT="$out/$name" timeout --kill-after=10 "$limit" bash -c "$cmd" >"$out/$name/log.txt" 2>&1
  rc=$?
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  case $rc in
  0) status=ok ;;
  124 | 137) status=timeout ;;
  *) status=failed ;;
  esac
  [ "$status" = ok ] || reason="exit $rc (limit ${limit} s); see $name/log.txt"
  record "$name" "$status" "$((($(date +%s%N) - start) / 1000000))e-3" "$cmd" "$reason"
  say "stage $name: $status"
  tail -3 "$out/$name/log.txt" | sed 's/^/  | /'
}

skip() { # NAME REASON COMMAND
  mkdir -p "$out/$1"
  record "$1" skipped 0 "$3" "$2"
  say "stage $1: skipped: $2"
}
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# ---- env: versions, and the wheels that came with the repository
site=/tmp/raytrain-site
wheels=$(find . -path ./.venv -prune -o -path './.whl*' -name '*.whl' -print 2>/dev/null | sort)
if [ "$mode" = run ] && [ -n "$wheels" ]; then
  # shellcheck disable=SC2086
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" $wheels >"$out/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$site" PATH="$site/bin:$PATH"
    say "installed $(echo "$wheels" | wc -l) wheels into $site"
  else
    say "warning: installing the wheels failed; see $out/wheels.log"
  fi
  # the sweep uploads the repository as its working directory: the wheels stay out of it
  mkdir -p /tmp/raytrain-wheels && mv .whl* /tmp/raytrain-wheels/ 2>/dev/null
elif [ -n "$wheels" ]; then
  say "dry run: would install $(echo "$wheels" | wc -l) wheels into $site"
fi
mkdir -p "$out/env"
cat >"$out/env/probe.py" <<'EOF'
import importlib, json, os, platform, shutil, subprocess, sys
import torch
mods = {}
for m in ("pydantic", "pytest", "deepspeed", "ray", "transformers", "pyarrow"):
    try:
        mods[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:  # noqa: BLE001
        mods[m] = f"missing ({type(e).__name__}: {e})"
cuda = torch.cuda.is_available()
smi = shutil.which("nvidia-smi")
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "cpus": os.cpu_count(),
        "nvidia_smi": subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else None,
        "wheels": int(sys.argv[2]), "modules": mods}
json.dump(info, open(os.path.join(sys.argv[1], "env.json"), "w"), indent=1)
print(json.dumps(info))
EOF
stage env "\"$PY\" \"\$STAGE_OUT/probe.py\" \"\$STAGE_OUT\" $(echo "$wheels" | grep -c .)"

# ---- cuda_tests: every test marked cuda (skipped, not failed, where there is no GPU)
if has pytest && has pydantic; then
  files=$(grep -l "mark.cuda" tests/test_*.py | tr '\n' ' ')
  stage cuda_tests "\"$PY\" -m pytest -m cuda -p no:cacheprovider -rs -q --junitxml=\"\$STAGE_OUT/junit.xml\" $files"
else
  skip cuda_tests "pytest or pydantic not importable (no .whl/ folder?)" "pytest -m cuda"
fi

# ---- the benchmarks (raytrain.bench): bf16 on the GPU; in the dry run the embedded scale on the CPU
bench="\"$PY\" jobs/benchmark.py --scale paper --device cuda"
losses=256,1024,4096
teacher=vitb16:224:512:64
cases= # all
if [ "$mode" = dry ]; then
  bench="\"$PY\" jobs/benchmark.py --scale embedded --device cpu --steps 1"
  losses=32
  teacher=tiny:32:64:32
  cases="--cases clip,rankclip_R3" # two check the stage (tests/test_bench.py runs every case)
fi
if has pydantic; then
  stage bench_eager "$bench --skip ingest --loss-batches $losses $cases --out \"\$STAGE_OUT\""
  compiled="$bench --compile --cases clip,rankclip_R3 --skip ingest,loss,decode --out \"\$STAGE_OUT\""
  if [ "$mode" = dry ]; then # compiling takes minutes on a CPU: the arguments are checked, not run
    stage bench_compiled "\"$PY\" jobs/benchmark.py --help >/dev/null && echo would run: ${compiled//\"/}"
  else
    stage bench_compiled "$compiled"
  fi
  stage teacher "$bench --skip cases,loss,ingest,decode --teacher $teacher --out \"\$STAGE_OUT\""
else
  for name in bench_eager bench_compiled teacher; do
    skip $name "pydantic not importable (no .whl/ folder?)" "$bench"
  done
fi

# ---- sweep: two trials of the order sweep on the GPU, through ray job submit
overrides="grid.loss.order=[0,3] grid.seed=[0] train.use_gpu=true train.epochs=2"
sweep="RAYTRAIN_RESULTS=\"\$STAGE_OUT/results\" bash infra/quickstart.sh $overrides"
if ! has ray; then
  why=$("$PY" -c 'import ray' 2>&1 | tail -1)
  skip sweep "ray not importable (${why:-?}): its cp312 wheel alone is ~79 MB, over one 64 MiB transfer (see --prepare)" "$sweep"
elif [ "$mode" = dry ]; then # a sweep takes minutes on a CPU: its config is validated, not run
  stage sweep "bash -n infra/quickstart.sh && \"$PY\" -c 'from raytrain.tune.sweep import load_space
space, base, trials = load_space(\"tune_spaces/order_sweep.yaml\", \"$overrides\".split())
print(len(trials), \"trials, use_gpu\", base.train.use_gpu)' && echo would run: ${sweep//\"/}"
else
  # quickstart's setup step installs into .venv from the network: give it one that already has
  # everything (this Python, its packages and the installed wheels), stamped as installed
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv && sha256sum pyproject.toml | cut -d' ' -f1 >.venv/.raytrain-installed
  fi
  stage sweep "$sweep"
fi

# ---- results: one JSON and one Markdown
"$PY" - "$out" "$mode" <<'EOF'
import csv, json, sys
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
order = ["env", "cuda_tests", "bench_eager", "bench_compiled", "teacher", "sweep"]
stages = {}
for name in order:
    path = out / name / "status.json"
    if not path.exists():
        continue
    s = json.loads(path.read_text())
    d = out / name
    log = d / "log.txt"
    s["log_tail"] = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
    samples = []
    if (d / "nvidia-smi.csv").exists():
        for row in csv.reader((d / "nvidia-smi.csv").read_text().splitlines()):
            try:
                samples.append((float(row[1]), float(row[2])))
            except (IndexError, ValueError):
                pass
    if samples:
        util = [u for u, _ in samples]
        s["gpu"] = {"samples": len(samples), "util_mean": sum(util) / len(util), "util_max": max(util),
                    "memory_mib_max": max(m for _, m in samples)}
    found = sorted(d.glob("benchmark-*.json")) + sorted(d.glob("env.json"))
    if found:
        s["results"] = json.loads(found[0].read_text())
    if (d / "results").exists():
        s["reports"] = [str(p.relative_to(out)) for p in sorted((d / "results").glob("*/report.md"))]
    stages[name] = s
summary = {"mode": mode, "stages": stages, "ok": all(s["status"] in ("ok", "skipped") for s in stages.values())}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))

lines = [f"# GPU check ({'dry run on a CPU' if mode == 'dry' else 'run'})", "",
         "| stage | status | s | GPU util mean / max % | note |", "|---|---|---|---|---|"]
for name, s in stages.items():
    gpu = s.get("gpu")
    util = f"{gpu['util_mean']:.0f} / {gpu['util_max']:.0f}" if gpu else "n/a"
    lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | {util} | {s['reason'] or ''} |")
env = stages.get("env", {}).get("results")
if env:
    lines += ["", f"Python {env['python']}, torch {env['torch']}, device {env['device']}; "
              + ", ".join(f"{k} {v}" for k, v in env["modules"].items())]
for name in ("bench_eager", "bench_compiled"):
    r = stages.get(name, {}).get("results")
    if not r or "cases" not in r:
        continue
    lines += ["", f"## {name} ({r['scale']} scale, {r['device']}, batch {r['batch_size']})", "",
              "| case | ms/step | samples/s | TFLOP/s | MFU |", "|---|---|---|---|---|"]
    for k, v in r["cases"].items():
        mfu = f"{v['mfu']:.1%}" if "mfu" in v else "n/a"
        lines.append(f"| {k} | {v['step_s'] * 1000:.1f} | {v['samples_per_s']:.0f} | {v['achieved_tflops']:.1f} | {mfu} |")
    lc = r.get("loss_cost")
    if lc:
        lines += ["", "| batch | R1/R0 | R3/R0 | R5/R0 | R5 peak MiB |", "|---|---|---|---|---|"]
        for b, e in lc.items():
            if b.startswith("B"):
                peak = e.get("R5", {}).get("peak_bytes")
                lines.append(f"| {b[1:]} | " + " | ".join(f"{e.get(f'R{x}_vs_R0', float('nan')):.2f}" for x in (1, 3, 5))
                             + f" | {'n/a' if peak is None else round(peak / 2**20)} |")
t = stages.get("teacher", {}).get("results", {}).get("teacher")
if t:
    lines += ["", f"Teacher cache ({t['teacher']}, {t['image_size']} px, {t['device']}): build {t['build_rows_per_s']:.0f} "
              f"rows/s, forward alone {t['model_rows_per_s']:.0f} rows/s: build_vs_model {t['build_vs_model']:.2f} (target ≥ 0.8)"]
for r in stages.get("sweep", {}).get("reports", []):
    lines += ["", f"Sweep report: {r}"]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
say "results: $out/gpu_check.json, $out/gpu_check.md"
