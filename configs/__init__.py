"""Config files (`get_config(arg)`, ml_collections); see configs/README.md."""
