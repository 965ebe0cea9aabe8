"""Repository control: which versions serve with which settings, loading and unloading, recalibration and its
jobs."""
