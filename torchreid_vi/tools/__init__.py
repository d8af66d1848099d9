"""Command-line tools of torchreid_vi (synthetic data generator, demos)."""
