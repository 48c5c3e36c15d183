"""raytrain: Ray-distributed training for vision-language pretraining with frozen vision teachers."""

__version__ = "0.1.0"
