"""Engine layer: training, inference and evaluation built on MONAI's engines, inferers and metrics."""
