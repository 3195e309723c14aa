"""--tune: the study on a held-out slice, each loss's search space, Optuna storages, and the tune report."""
