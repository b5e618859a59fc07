"""Data layer: dataset readers (MSD, FeTA, BTCV, nnU-Net, datalists), validation, synthetic data, I/O, transforms."""
