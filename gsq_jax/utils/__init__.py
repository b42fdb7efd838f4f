"""Small helpers with no model code (e.g. reading torch checkpoints without torch)."""
