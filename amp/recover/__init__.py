"""Recovery after pruning: LoRA (peft) with optional distillation from the dense model. config.py (RecoverConfig),
data.py (records, tokens, batches), train.py (the loop: losses, schedule, merge), checkpoints.py (bit-exact
resume), run.py (`amp recover`, folder to folder)."""
