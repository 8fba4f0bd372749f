"""Files kdlib writes into standard transformers checkpoints (kdlib.teacher_export)."""
