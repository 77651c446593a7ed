"""Training: the LightningModule (loss, parameter groups, schedule) and the run around it."""
