"""Evaluation of dino-vos: DAVIS J&F for propagation runs and image baselines of backbones."""
