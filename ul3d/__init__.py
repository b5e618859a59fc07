"""ul3d: ultra-lightweight U-shaped networks for 2D/3D medical image segmentation, built on MONAI."""

__version__ = "0.1.0"
