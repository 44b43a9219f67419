"""m2skd: Multi-to-Single Knowledge Distillation for LiDAR semantic segmentation."""

__version__ = "0.1.0"
