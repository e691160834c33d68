"""Using a growth run's small model at inference: as the grown model's draft (assisted generation,
draft.py) and as the cheap first stage of a scoring cascade (cascade.py)."""
