"""peft glue: one folder per method (config, layer, model), on the shared base in ``base.py``."""
