"""The findings report: result tables (mean ± std over seeds), plots, provenance, health."""
