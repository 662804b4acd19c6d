"""torchmm_ext.checkpoints."""
