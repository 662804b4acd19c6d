"""torchmm_ext: composable ALBEF builders and recipes with PELA, ELIP and DAS efficiency blocks."""

__version__ = "0.1.0"
