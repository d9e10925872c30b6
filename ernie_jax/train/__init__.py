"""Training: optimizer (AdamW + WSD), EMA, the jitted train step, FLOPs / MFU, the loop."""
