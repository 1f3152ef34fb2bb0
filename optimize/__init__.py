"""Variant building: a reference model plus an ordered recipe of techniques."""
