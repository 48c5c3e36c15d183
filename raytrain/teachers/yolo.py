"""Frozen YOLOv8 region teacher for DCLIP (docs/methods.md#frozen-teachers), through ultralytics, fully offline.

    teacher = YOLOTeacher()                          # yolov8n.yaml, seeded random weights
    regions = teacher.detect(images)                 # uint8 [B, H, W, 3] RGB -> list[Regions]
    batch = stack(regions)                           # dict of [B, top_k, ...] tensors
    feats = crop_features(pixels, batch["boxes"], dinov3_teacher)   # [B, top_k, D]
    w = region_scores(batch["conf"], batch["area"], text_sim, valid=batch["valid"])

Weights come from a local `.pt` (`path`; ultralytics' own checkpoint format, e.g. written by
`YOLO.save`) or, without a path, from the model yaml shipped inside ultralytics with
weights seeded inside a forked RNG (every worker builds the same detector and the caller's
RNG stream is untouched). A random detector usually finds nothing at the default `conf`:
outputs keep their fixed shapes with `valid` all False.

No network, ever. Importing this module, before ultralytics is imported:
  * sets `YOLO_OFFLINE=1`: ultralytics then skips the DNS probe it runs at import
    (`utils.is_online`) and treats itself as offline (no pip AutoUpdate, no PyPI version
    check, no analytics events);
  * sets `YOLO_CONFIG_DIR` (only if unset) to a private `$XDG_CACHE_HOME/raytrain/ultralytics`
    (default `~/.cache/...`), so ultralytics' settings.json is not shared with other tools.
Building a teacher then turns off in the settings what could reach out (`sync`, the
logging integrations, the VS Code / OpenVINO notices: `ultralytics.settings.update(...)`;
8.4.190 has no separate "hub" switch: the Hub is only contacted for Hub model URLs and Hub
training sessions, neither of which is reachable from here), and, in case ultralytics was
imported before this module, forces its import-time `ONLINE` flags to False and disables its
event sender. `path` must be an existing local file and `model_yaml` must not be a URL, so
ultralytics' asset download (`attempt_download_asset`) never has anything to fetch.
Predictions run with `save=False, verbose=False` and nothing is plotted, so no font is
fetched either.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

os.environ["YOLO_OFFLINE"] = "1"
if not os.environ.get("YOLO_CONFIG_DIR"):
    _cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ["YOLO_CONFIG_DIR"] = str(_cache / "raytrain" / "ultralytics")

import ultralytics  # noqa: E402  (after the environment above)
from ultralytics import YOLO  # noqa: E402

from raytrain.teachers.weights import weights_hash  # noqa: E402

SEED = 0
# Settings that make ultralytics contact a server (or a third-party logger) when on.
OFFLINE_SETTINGS = dict(
    sync=False,  # anonymous usage analytics + crash reports
    clearml=False,
    comet=False,
    dvc=False,
    mlflow=False,
    raytune=False,
    tensorboard=False,
    wandb=False,
    vscode_msg=False,
    openvino_msg=False,
)


def ensure_offline() -> None:
    """Make the imported ultralytics offline (idempotent; writes settings only if they differ)."""
    import ultralytics.utils as uu
    from ultralytics.utils import checks, events

    os.environ["YOLO_OFFLINE"] = "1"
    for module in (uu, checks, events):  # constants computed at ultralytics' import
        module.ONLINE = False
    events.events.enabled = False
    changed = {k: v for k, v in OFFLINE_SETTINGS.items() if ultralytics.settings.get(k) != v}
    if changed:
        ultralytics.settings.update(changed)


@dataclass
class Regions:
    """One image's detections, padded/truncated to top_k, highest confidence first."""

    boxes: torch.Tensor  # [k, 4] float32 xyxy in [0, 1] (fractions of width / height)
    conf: torch.Tensor  # [k] float32 detector confidence (0 for padding)
    cls: torch.Tensor  # [k] int64 class index (-1 for padding)
    area: torch.Tensor  # [k] float32 box area as a fraction of the image (0 for padding)
    valid: torch.Tensor  # [k] bool, False for padding

    @classmethod
    def empty(cls, k: int) -> Regions:
        return cls(
            boxes=torch.zeros(k, 4),
            conf=torch.zeros(k),
            cls=torch.full((k,), -1, dtype=torch.long),
            area=torch.zeros(k),
            valid=torch.zeros(k, dtype=torch.bool),
        )


def stack(regions: Sequence[Regions]) -> dict[str, torch.Tensor]:
    """list of B Regions -> {"boxes": [B, k, 4], "conf"/"cls"/"area"/"valid": [B, k]}."""
    if not regions:
        raise ValueError("stack() needs at least one Regions")
    return {f.name: torch.stack([getattr(r, f.name) for r in regions]) for f in fields(Regions)}


def _as_image_list(images) -> list[np.ndarray]:
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    out = [np.asarray(im) for im in images]  # [B, H, W, 3] array -> B arrays, or a list as is
    for i, im in enumerate(out):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"image {i}: expected uint8 [H, W, 3] RGB, got {im.dtype} {tuple(im.shape)}")
    return out


class YOLOTeacher:
    """Frozen ultralytics YOLOv8 detector producing a fixed number of regions per image."""

    def __init__(
        self,
        path: str | None = None,
        model_yaml: str = "yolov8n.yaml",
        top_k: int = 8,
        conf: float = 0.001,
        image_size: int = 64,
        device: str | torch.device = "cpu",
    ):
        if top_k < 1:
            raise ValueError(f"teachers.yolo.top_k must be >= 1, got {top_k}")
        ensure_offline()
        if path:
            file = Path(path).expanduser()
            if not file.is_file():
                # Checked here: ultralytics would treat an unknown name as a release asset to download.
                raise FileNotFoundError(f"teachers.yolo.path {path!r} does not exist or is not a file")
            self.source = str(file.resolve())
            self.model = YOLO(self.source, task="detect")
        else:
            if "://" in model_yaml or not model_yaml.endswith((".yaml", ".yml")):
                raise ValueError(f"teachers.yolo.model_yaml {model_yaml!r} must name a local/bundled .yaml")
            self.source = model_yaml
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)
                self.model = YOLO(model_yaml, task="detect")
        self.model.model.eval().requires_grad_(False)
        self.top_k, self.conf, self.image_size = int(top_k), float(conf), int(image_size)
        self.device = str(device)
        self.names = dict(self.model.names)
        # The predictor folds BatchNorm into the convolutions on first use, which changes
        # state_dict(): hash the weights as loaded, once.
        self._fingerprint = weights_hash(self.model.model)

    def fingerprint(self) -> str:
        """sha256 over parameter/buffer names, shapes, dtypes and bytes of the loaded model."""
        return self._fingerprint

    @torch.no_grad()
    def detect(self, images) -> list[Regions]:
        """uint8 RGB images ([B, H, W, 3] array/tensor, or a list of [H, W, 3]) -> B Regions."""
        ims = _as_image_list(images)
        if not ims:
            return []
        ensure_offline()
        results = self.model.predict(
            [np.ascontiguousarray(im[..., ::-1]) for im in ims],  # ultralytics takes numpy as BGR
            imgsz=self.image_size,
            conf=self.conf,
            max_det=self.top_k,
            device=self.device,
            save=False,
            verbose=False,
            stream=False,
        )
        return [self._regions(r) for r in results]

    def _regions(self, result) -> Regions:
        out = Regions.empty(self.top_k)
        b = result.boxes
        if b is None or len(b) == 0:
            return out
        conf = b.conf.detach().float().cpu()
        boxes = b.xyxyn.detach().float().cpu().clamp(0, 1)
        # A box clipped to nothing is no region (and would be mistaken for padding).
        keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).nonzero().flatten()
        order = keep[torch.argsort(conf[keep], descending=True, stable=True)][: self.top_k]
        n = len(order)
        boxes = boxes[order]
        out.boxes[:n] = boxes
        out.conf[:n] = conf[order]
        out.cls[:n] = b.cls.detach().cpu()[order].long()
        out.area[:n] = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        out.valid[:n] = True
        return out

    stack = staticmethod(stack)


REGION_WEIGHTS = (1 / 3, 1 / 3, 1 / 3)  # (confidence, area, text similarity)


def region_scores(
    conf: torch.Tensor,
    area: torch.Tensor,
    text_sim: torch.Tensor,
    weights: tuple[float, float, float] = REGION_WEIGHTS,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """DCLIP's per-region weight from detector confidence, box area and text similarity.

    DCLIP (Csizmadia et al., 2025), §3.1 "Cross-Modal Teacher Design" (repeated in Appendix A,
    "Model Architecture Details"): "each region is weighted using a penalty based on YOLO's
    classification confidence, bounding box area, and cosine similarity to the paired text
    description". That sentence is all the paper says: it gives no equation and no
    weights for this score (the equation it does give in §3.1 is the temperature-scaled
    aggregation of the attended embeddings, not this score). The combination below is
    therefore this project's choice, the simplest one that uses exactly those three inputs:

        score = w_conf * conf + w_area * area + w_text * text_sim

    with conf in [0, 1], area the box area as a fraction of the image in [0, 1], text_sim the
    cosine similarity in [-1, 1] between the region's embedding and its caption's, and equal
    weights (1/3 each) by default. Inputs broadcast (e.g. [B, k] each); entries where `valid`
    is False score 0.
    """
    w_conf, w_area, w_text = (float(w) for w in weights)
    score = w_conf * conf.float() + w_area * area.float() + w_text * text_sim.float()
    if valid is not None:
        score = torch.where(valid.bool(), score, torch.zeros_like(score))
    return score


@torch.no_grad()
def crop_features(
    images: torch.Tensor,
    boxes: torch.Tensor,
    dinov3_teacher,
    size: int | None = None,
    valid: torch.Tensor | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """DINOv3 CLS features of each region's crop: [B, k, D], zero where a region is invalid.

    `images` [B, 3, H, W] are normalized as the data pipeline normalized them (what the DINOv3
    teacher takes), `boxes` [B, k, 4] xyxy in [0, 1]. Each box is cut out with
    torchvision's roi_align (bilinear, aligned pixel centres, adaptive sampling so shrinking
    averages) to `size` x `size` (default: the teacher's image size) and run through the
    teacher. `valid` [B, k] defaults to boxes of positive width and height, so the zero
    padding of `stack()` is skipped.
    """
    from torchvision.ops import roi_align

    if images.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != images.shape[0]:
        raise ValueError(
            f"expected images [B, 3, H, W] and boxes [B, k, 4], got {tuple(images.shape)} and {tuple(boxes.shape)}"
        )
    size = int(size or dinov3_teacher.image_size)
    device = next(dinov3_teacher.parameters()).device
    b, k = boxes.shape[:2]
    boxes = boxes.to(device=device, dtype=torch.float32)
    if valid is None:
        valid = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    valid = valid.to(device=device, dtype=torch.bool)
    out = torch.zeros(b, k, dinov3_teacher.dim, device=device, dtype=torch.float32)
    idx = valid.nonzero()  # [n, 2] (image, region)
    if len(idx) == 0:
        return out
    x = images.to(device=device, dtype=torch.float32)
    h, w = x.shape[-2:]
    scale = torch.tensor([w, h, w, h], device=device, dtype=torch.float32)
    rois = torch.cat([idx[:, :1].float(), boxes[idx[:, 0], idx[:, 1]] * scale], 1)  # [n, 5] pixels
    feats = []
    for start in range(0, len(rois), batch_size):
        part = rois[start : start + batch_size]
        crops = roi_align(x, part, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        feats.append(dinov3_teacher(crops).cls.float())
    out[idx[:, 0], idx[:, 1]] = torch.cat(feats)
    return out
