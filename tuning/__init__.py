"""Ray Tune sweeps over N_max, CFG scale and learning rate (arrives with the tuning issue)."""
