"""Video object segmentation benchmarks: DAVIS, YouTube-VOS, parameter sweeps."""
