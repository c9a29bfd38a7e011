"""peft glue: one folder per method (config, layer, model), on the shared base in ``base.py``."""

# First, before any submodule: if this is the first import of peft, hirank registers its methods right after
# it (hirank._peft), and that imports the submodules below, which must not be half-initialized then.
import peft  # noqa: F401
