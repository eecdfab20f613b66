"""Command-line tools around the trainer: entropy analysis, its plots, batch generation, scoring a folder."""
