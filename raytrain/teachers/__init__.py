"""Frozen teachers (DINOv3, text, YOLO) and the cache of their outputs.

`build_dinov3`, `build_text` and `build_yolo` turn a `teachers.*` config section into its frozen
module; the heavy libraries behind them (transformers, sentence-transformers, ultralytics) are
imported only when one is built.
"""

DATA_MEAN = DATA_STD = (0.5, 0.5, 0.5)  # DataConfig's defaults


def build_dinov3(cfg, data_mean=DATA_MEAN, data_std=DATA_STD):
    """The DINOv3 teacher of `teachers.dinov3` (`cfg`) for images normalized with (data_mean,
    data_std): a local checkpoint, the embedded one (pretrained here once per machine), or
    seeded random weights."""
    from raytrain.teachers.dinov3 import EMBEDDED, DINOv3Teacher

    weights = cfg.path
    if weights == EMBEDDED:
        from raytrain.teachers.embedded import ensure_teacher

        weights = str(ensure_teacher(cfg.size, cfg.image_size))
    return DINOv3Teacher(cfg, weights, data_mean, data_std)


def build_text(cfg):
    """The sentence encoder of `teachers.text` (`cfg`)."""
    from raytrain.teachers.text import TextTeacher

    return TextTeacher(cfg.path)


def build_yolo(cfg):
    """The region detector of `teachers.yolo` (`cfg`)."""
    from raytrain.teachers.yolo import YOLOTeacher

    return YOLOTeacher(cfg.path, cfg.model_yaml, cfg.top_k, cfg.conf, cfg.image_size)
