"""The prune: passes over a layer stream (passes.py, layer_run.py, capture.py), what one resident layer yields
(statistics.py: hooks and kernels; observe.py: scores and sensitivity curves), criteria (criteria.py), the
budget (allocate.py: counting and the uniform plan; budget.py: per-layer allocation), keep sets (keep.py),
compensation (compensate.py), the only code that mutates a model (slicing.py), and the report (report.py)."""
