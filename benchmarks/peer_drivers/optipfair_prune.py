"""Runs in OptiPFair's own environment (benchmarks/peers.py makes it): its MLP-GLU width pruning with the
data-driven MAW score (weight magnitudes times activation norms over the calibration batches), no compensation,
cut to a given intermediate width; saves the pruned model with save_pretrained.
    python optipfair_prune.py JOB.json   (JOB: model, out, calibration token ids, intermediate width)"""
import json
import sys
import time

import torch
from optipfair import prune_model
from transformers import AutoModelForCausalLM, AutoTokenizer

job = json.loads(open(sys.argv[1]).read())
model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
ids = torch.tensor(job["calibration"])
batches = [(ids[i:i + 8], torch.ones_like(ids[i:i + 8])) for i in range(0, len(ids), 8)]
size = model.config.intermediate_size
# OptiPFair prunes int(percentage / 100 * size) neurons: aim half a neuron above to land on the width asked for
percentage = 100 * (size - job["intermediate_size"] + 0.5) / size
start = time.perf_counter()
model = prune_model(model, pruning_type="MLP_GLU", neuron_selection_method="MAW", pruning_percentage=percentage,
                    dataloader=batches, show_progress=False)
seconds = time.perf_counter() - start
widths = sorted({layer.mlp.gate_proj.out_features for layer in model.model.layers})
assert widths == [job["intermediate_size"]], widths
model.config.intermediate_size = widths[0]
model.save_pretrained(job["out"])
AutoTokenizer.from_pretrained(job["model"]).save_pretrained(job["out"])
print("RESULT " + json.dumps({"seconds": seconds, "params": sum(p.numel() for p in model.parameters()),
                              "settings": {"pruning_type": "MLP_GLU", "neuron_selection_method": "MAW",
                                           "pruning_percentage": percentage, "calibration_batches": len(batches)}}))
