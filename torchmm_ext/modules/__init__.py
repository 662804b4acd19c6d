"""torchmm_ext.modules."""
