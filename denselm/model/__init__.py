"""Model: pooling (pure functions), the encoder (backbone -> pool -> normalise), LoRA set-up."""
