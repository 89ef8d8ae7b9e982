"""pathfm: DINOv2-style pathology foundation models trained on tiles sampled online from slides."""

__version__ = "0.1.0"
