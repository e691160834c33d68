"""The parts of a dsgrow training run that dsgrow/train.py's loop composes: data preparation and
resume checks (setup.py), the objective per family (objective.py), a stage's batch and LR
schedule (schedule.py), and metrics (metrics.py). Each owns its own state."""
