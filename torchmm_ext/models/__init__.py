"""torchmm_ext.models."""
