"""Training: AdamW and the schedule, the trainer loop, checkpoints, the memory estimate and monitor."""
