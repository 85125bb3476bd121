"""What a loaded model runs on, with no knowledge of pruning or of files: models whose layers differ in shape
(the `amp_per_layer` config form and the patch that makes transformers build it), attention with an arbitrary
query-head -> KV-head map registered with transformers, and the fused attention and MLP (`accelerate_`)."""
