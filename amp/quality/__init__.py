"""Measuring a finished model: perplexity (perplexity.py), zero-shot accuracy through lm-eval (zeroshot.py), both
for a folder (evaluate.py, `amp eval`) with the Markdown table (table.py), and a greedy continuation with its speed
(generation.py, `amp generate`)."""
