"""Image baselines of backbones: weighted k-NN, linear probe, transfer."""
