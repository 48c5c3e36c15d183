"""`raytrain eval`: score a trained model on the configured suite (eval.tasks) and write one
JSON per task, in clip_benchmark's layout and metric names, plus summary.md.

    raytrain eval [--config FILE] [--out DIR] [--parallel] <checkpoint | exported student> [overrides]

The model is a trial checkpoint (model.pt + config.json: the config rebuilds the method,
frozen teachers included, the trained weights load over it, and the method's own
encode_images/encode_texts are scored, so teacher-injecting and frozen-encoder methods are
evaluated as they evaluate in training) or an exported student (model.safetensors +
config.json). Images are preprocessed as training decodes them: resized (bicubic) to the
model's square image size and normalized with its mean/std. Segmentation tasks score the
method's own encode_patches (raytrain.eval.segmentation), upsampled to each mask's size.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raytrain.config import Config, ConfigError, DataConfig, EvalTaskConfig, make_config
from raytrain.data.sources import resolve, uri, write_atomic
from raytrain.eval.datasets import (
    CIFAR_FILES,
    DatasetError,
    cifar,
    embedded_retrieval,
    embedded_zeroshot,
    image_folder,
    karpathy,
)
from raytrain.eval.segmentation import embedded_segmentation, voc_segmentation, zeroshot_segmentation
from raytrain.eval.suite import retrieval, zeroshot
from raytrain.eval.zeroshot import SINGLE

# clip_benchmark's names (it has no segmentation task: ours follows the pattern)
TASK_NAMES = {
    "retrieval": "zeroshot_retrieval",
    "zeroshot": "zeroshot_classification",
    "segmentation": "zeroshot_segmentation",
}
RECALL_K = (1, 5, 10)
SUMMARY = "summary.md"
PATHS = ("path", "annotations", "classnames")  # a task's local files


@dataclass
class Encoders:
    """A model as the suite calls it, and what its results are filed under."""

    model: str  # clip_benchmark's "model": the method's name, or "student" for an export
    pretrained: str  # clip_benchmark's "pretrained": the directory it was loaded from
    images: Callable[[list], torch.Tensor]  # encoded bytes or PIL images -> [n, d]
    texts: Callable[[list[str]], torch.Tensor]  # captions or prompts -> [n, d]
    eval_dir: str | None = None  # the embedded evaluation splits it was trained with, if recorded
    data: DataConfig = field(default_factory=DataConfig)  # whose embedded default embedded tasks use otherwise
    # images -> patch embeddings [n, h, w, d] in texts' space, or None (or None returned): no patch tokens
    patches: Callable[[list], torch.Tensor | None] | None = None


def load_model(path, device: str = "cpu", data: DataConfig | None = None) -> Encoders:
    """Encoders of a checkpoint or export directory. A checkpoint's embedded tasks use the
    evaluation splits it trained with; an export's use `data`'s embedded default."""
    from raytrain import checkpoint, export

    path = Path(path)
    if (path / export.STUDENT_WEIGHTS).is_file():
        student = export.ExportedStudent.load(path)
        module, prep, tokenizer = student.model.to(device), student.meta["data"], student.tokenizer
        encode_image, encode_text = module.encode_image, lambda tokens, captions: module.encode_text(tokens)
        encode_patches = module.patch_embeddings
        name, eval_dir, data = "student", None, data or DataConfig()
    elif (path / checkpoint.WEIGHTS).is_file():
        from raytrain.data.pipeline import DataSource
        from raytrain.methods import build_method

        state, meta = checkpoint.load(path)
        cfg = make_config(meta["config"])
        if "source" not in meta:
            raise ConfigError(f"{path / checkpoint.CONFIG} has no 'source': not a checkpoint written by a training run")
        src = DataSource(**meta["source"])
        tokenizer = src.tokenizer(cfg.data)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # as train.loop.eval_model: the frozen teachers of training
            method = build_method(cfg, tokenizer.vocab_size, tokenizer.pad_id)
        try:
            method.load_state_dict(state["engine"]["model"])
        except (KeyError, RuntimeError) as e:
            raise ConfigError(
                f"{path / checkpoint.WEIGHTS}: its weights do not fit the {cfg.method} its config builds "
                f"({str(e).strip().splitlines()[0]})"
            ) from None
        method.to(device).eval()
        prep = {k: getattr(cfg.data, k) for k in ("image_size", "context_length", "mean", "std")}
        encode_image, encode_text, encode_patches = method.encode_images, method.encode_texts, method.encode_patches
        name, eval_dir, data = cfg.method, src.eval_dir, cfg.data
    else:
        raise FileNotFoundError(
            f"{path} is neither a trial checkpoint ({checkpoint.WEIGHTS} + {checkpoint.CONFIG}) "
            f"nor an exported student ({export.STUDENT_WEIGHTS} + {export.STUDENT_CONFIG})"
        )

    def images(items: list) -> torch.Tensor:
        return encode_image(_pixels(items, prep["image_size"], prep["mean"], prep["std"]).to(device))

    def texts(captions: list[str]) -> torch.Tensor:
        return encode_text(torch.from_numpy(tokenizer(captions, prep["context_length"])).to(device), captions)

    def patches(items: list) -> torch.Tensor | None:
        return encode_patches(_pixels(items, prep["image_size"], prep["mean"], prep["std"]).to(device))

    return Encoders(name, str(path), images, texts, eval_dir, data, patches)


def run_task(enc: Encoders, task: EvalTaskConfig) -> dict:
    """One task's result in clip_benchmark's layout: {dataset, model, pretrained, task,
    metrics, language}. Retrieval metrics image_retrieval_recall@K (caption queries over
    images) and text_retrieval_recall@K (image queries over captions: found when any of the
    image's captions is in the top K); zero-shot acc1, acc5 (None under 5 classes, as
    clip_benchmark) and mean_per_class_recall; segmentation miou and per_class_iou
    {class name: IoU, None for a class in neither prediction nor masks}."""
    try:
        data = _dataset(task, enc)
        if task.kind == "retrieval":
            m, _, _ = retrieval(enc.images, enc.texts, data, task.batch_size, RECALL_K, desc=task.name)
            metrics = {}
            for k in RECALL_K:
                metrics[f"image_retrieval_recall@{k}"] = m[f"t2i_r@{k}"]
                metrics[f"text_retrieval_recall@{k}"] = m[f"i2t_r@{k}"]
        elif task.kind == "zeroshot":
            templates = data.templates if task.templates == "ensemble" else SINGLE
            m = zeroshot(enc.images, enc.texts, data, templates, task.batch_size, desc=task.name)
            top5 = m["top5"] if len(data.classes) >= 5 else None
            metrics = {"acc1": m["top1"], "acc5": top5, "mean_per_class_recall": m["mean_per_class_recall"]}
        else:
            metrics = _segment(enc, task, data)
    except DatasetError as e:
        raise DatasetError(f"eval task {task.name!r}: {e}") from None
    return {
        "dataset": task.name,
        "model": enc.model,
        "pretrained": enc.pretrained,
        "task": TASK_NAMES[task.kind],
        "metrics": metrics,
        "language": "en",
    }


def run_eval(model_path, cfg: Config, out="results/eval", parallel: bool = False) -> str:
    """Score the model at `model_path` on cfg.eval.tasks, writing <out>/<task name>.json as
    each task finishes and <out>/summary.md last (`out` local or s3://); returns the summary's
    path. `parallel` (and more than one task): one Ray task per eval task (eval.num_cpus /
    eval.num_gpus each), every one loading the model itself; else all in this process, one
    model load, no Ray needed."""
    tasks = {t.name: t for t in cfg.eval.tasks}
    for t in tasks.values():  # before any model loads: a typo should not cost a split's encoding
        for key in PATHS:
            if (value := getattr(t, key)) is not None and not Path(value).exists():
                raise DatasetError(f"eval task {t.name!r}: {key} {value} does not exist")
    fs, base = resolve(str(out), cfg.data.s3)
    results, seconds = {}, {}

    def write(name: str, result: dict, started: float) -> None:
        results[name], seconds[name] = result, time.perf_counter() - started
        write_atomic(fs, f"{base}/{name}.json", (json.dumps(result, indent=2) + "\n").encode())

    started = time.perf_counter()
    if parallel and len(tasks) > 1:
        import ray

        if not ray.is_initialized():
            ray.init()
        remote = ray.remote(_load_and_run).options(num_cpus=cfg.eval.num_cpus, num_gpus=cfg.eval.num_gpus)
        # absolute paths: a Ray worker need not run in this process's working directory
        pending = {
            remote.remote(os.path.abspath(model_path), _absolute(t), cfg.eval.device, cfg.data): name
            for name, t in tasks.items()
        }
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, ValueError | OSError):  # bad input: its own message, not a remote traceback
                    raise e.cause from None
                raise
            write(pending.pop(done[0]), result, started)
    else:
        enc = load_model(model_path, _device(cfg.eval.device), cfg.data)
        for name, t in tasks.items():
            started = time.perf_counter()
            write(name, run_task(enc, t), started)
    summary = f"{base}/{SUMMARY}"
    write_atomic(
        fs, summary, summarize([results[n] for n in tasks], list(tasks.values()), [seconds[n] for n in tasks]).encode()
    )
    return uri(fs, summary)


def _segment(enc: Encoders, task: EvalTaskConfig, data) -> dict:
    templates = data.templates if task.templates == "ensemble" else SINGLE
    m = None
    if enc.patches is not None:
        m = zeroshot_segmentation(enc.patches, enc.texts, data, templates, task.batch_size, desc=task.name)
    if m is None:
        raise ConfigError(
            f"eval task {task.name!r}: {enc.model} ({enc.pretrained}) gives no patch embeddings in its image-text "
            "space (e.g. DINORANKCLIP with dinorankclip.eval_inject: its injection is global), "
            "which segmentation scores"
        )
    per_class = {c: None if math.isnan(v) else v for c, v in zip(data.classes, m["per_class_iou"])}
    return {"miou": m["miou"], "per_class_iou": per_class}


def summarize(results: list[dict], tasks: list[EvalTaskConfig], seconds: list[float]) -> str:
    """One Markdown table: a row per task, a column per number any task reported (per-class
    IoU stays in the task's JSON)."""
    metrics = list(dict.fromkeys(k for r in results for k, v in r["metrics"].items() if not isinstance(v, dict)))
    header = ["task", "type", "prompts", *metrics, "seconds"]
    rows = []
    for r, t, s in zip(results, tasks, seconds):
        prompts = "–" if t.kind == "retrieval" else t.templates
        cells = ["–" if r["metrics"].get(m) is None else f"{r['metrics'][m]:.4f}" for m in metrics]
        rows.append([r["dataset"], r["task"], prompts, *cells, f"{s:.1f}"])
    lines = [
        f"# Evaluation of {results[0]['model']} ({results[0]['pretrained']})",
        "",
        "Metrics as clip_benchmark names them (fractions in [0, 1]); one JSON per task beside this file. "
        "With --parallel, seconds are from the start of all tasks.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def _load_and_run(model_path: str, task: EvalTaskConfig, device: str, data: DataConfig) -> dict:
    """A Ray task: load the model where it runs (a module does not travel) and score one task."""
    return run_task(load_model(model_path, _device(device), data), task)


def _absolute(task: EvalTaskConfig) -> EvalTaskConfig:
    return task.model_copy(update={k: os.path.abspath(v) for k in PATHS if (v := getattr(task, k)) is not None})


def _device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("eval.device=cuda but no CUDA device is visible here")
    return setting


def _dataset(task: EvalTaskConfig, enc: Encoders):
    if task.format == "karpathy":
        return karpathy(task.path, task.annotations)
    if task.format == "imagefolder":
        return image_folder(task.path, task.classnames)
    if task.format in CIFAR_FILES:
        return cifar(task.path, task.format)
    if task.format == "voc":
        return voc_segmentation(task.path, task.classnames)
    eval_dir = task.path or _embedded_dir(enc, task.kind)
    read = {"retrieval": embedded_retrieval, "zeroshot": embedded_zeroshot, "segmentation": embedded_segmentation}
    data = read[task.kind](eval_dir)
    if data is None:
        need = {
            "retrieval": "retrieval.parquet",
            "zeroshot": "zeroshot.parquet and a classes.json with classes",
            "segmentation": "segmentation.parquet and segmentation.json: an embedded dataset of schema version >= 2",
        }[task.kind]
        raise DatasetError(f"{eval_dir}: no {task.kind} split (needs {need})")
    return data


def _embedded_dir(enc: Encoders, kind: str) -> str:
    """The evaluation splits the model trained with, else its data section's embedded default
    (generated once, deterministically, as training does). A model trained before the
    segmentation split existed gets the regenerated default for it: every other split of it is
    byte-identical to the one it trained with."""
    if enc.eval_dir and Path(enc.eval_dir).is_dir():
        if (
            kind != "segmentation"
            or (Path(enc.eval_dir) / "segmentation.parquet").exists()
            or enc.data.path != "embedded"
        ):
            return enc.eval_dir
    d = enc.data
    if d.path != "embedded":
        raise DatasetError(
            f"the model's training data {d.path} has no evaluation splits on this machine; "
            "set the task's path to a directory of them"
        )
    from raytrain.data.synthetic import ensure_dataset

    return str(ensure_dataset(os.path.expanduser(d.root), d.n_train, d.n_eval, d.seed, d.image_size) / "eval")


def _pixels(images: list, size: int, mean, std) -> torch.Tensor:
    """Encoded bytes or PIL images -> float [n, 3, size, size], as training decodes them."""
    from raytrain.data.transforms import decode_image, normalize

    arrays = []
    for img in images:
        if isinstance(img, Image.Image):
            img = img.convert("RGB")
            arrays.append(np.asarray(img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC)))
        elif (decoded := decode_image(img, size)) is not None:
            arrays.append(decoded)
        else:
            raise DatasetError("an evaluation image does not decode")
    return torch.from_numpy(normalize(np.stack(arrays), mean, std))
