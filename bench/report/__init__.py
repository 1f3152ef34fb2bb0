"""Reports over a run directory."""
