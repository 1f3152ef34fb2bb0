"""prune techniques; each module registers its step configs with ``optimize.registry.register``."""
