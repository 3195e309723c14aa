"""Training one stage: the distiller (the step as a plain module), the LightningModule, hooks and connectors,
mixing, EMA, ensembles, optimisers, the teacher cache, checkpoint I/O, callbacks and the stage builder."""
