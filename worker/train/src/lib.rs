//! Training math: losses, AdamW, schedules, atomic training checkpoints
