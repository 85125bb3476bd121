"""The KL allocation's yardstick: how far the model's next-token distribution moves per unit of error at each
output projection, measured on calibration windows, and the divergence the pruned model reaches on held-back
windows that no step of the prune has seen.

Second order: a small change d of what a projection writes (o_proj, down_proj, a mixture's experts) moves the KL
divergence of the model's output from the dense one by about 1/2 d^T F d, F the Fisher of the output distribution
with respect to that projection's output. Its diagonal, averaged over tokens (one float per output channel),
weighs the structured-OBS error (prune/obs.py), so that the errors of every layer and module are in one unit,
predicted nats of KL per token, and one budget solve compares them. F is estimated the usual way: next tokens
sampled from the dense model's own distribution, the gradient of their log-likelihood, squared.

Streaming, as the prune: a forward pass over the last --holdout calibration windows keeps each layer's input
(tokens x hidden per layer: on the host, or memory-mapped in the staging folder when large), then a backward pass
reads the layers again, last first, re-runs each on its input with gradients and hands the gradient to the layer
before. One layer is resident at a time; the cost is two more reads of every layer and three forward passes' worth
of compute over those tokens (by default 8 windows); the held-back windows ride along the forward pass, dense."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..io.activations import ActivationStore, choose_offload
from ..io.calibration import make_batches
from .capture import _to, capture_layer_inputs


@dataclass
class LayerFisher:
    """Per output channel, the mean over held-back tokens of the squared gradient of the sampled log-likelihood
    with respect to what the attention's output projection (o) and the MLP or experts (mlp) write."""
    o: torch.Tensor
    mlp: torch.Tensor


class Head:
    """The model's own head on last hidden states (final norm, lm_head, soft-capping where the family has it), in
    the dtype the layers computed in: a bf16 checkpoint on a CPU without bf16 arithmetic computes each resident
    layer in float32 (common/dtypes.py), and so its head, from a float32 copy of the stored weights made once."""

    def __init__(self, model, dtype: torch.dtype):
        norm = getattr(model.model, "norm", None) or model.model.final_layernorm
        same = all(p.dtype == dtype for p in norm.parameters())
        self.norm = norm if same else copy.deepcopy(norm).to(dtype).requires_grad_(False)
        head = model.lm_head
        self.weight = head.weight.detach().to(dtype)
        self.bias = None if head.bias is None else head.bias.detach().to(dtype)
        self.cap = getattr(model.config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.norm(hidden), self.weight, self.bias).float()
        return torch.tanh(logits / self.cap) * self.cap if self.cap else logits


@contextmanager
def head_of(run):
    """The head on the device in the run's compute dtype, for as long as the block lasts."""
    with run.source.embeddings(run.device, head=True):
        yield Head(run.model, run.dtype)


class HeldOut:
    """The held-back windows as they go through the layers: their hidden states (a small activation store), every
    layer's other arguments, and the dense model's last hidden states once a dense pass has run."""

    def __init__(self, run, samples: list[torch.Tensor]):
        self.run, self.samples = run, samples
        self.batches = make_batches(samples, run.config.batch_size, run.pad_id)
        self.masks = [None if bool(m.all()) else m.bool().to(run.device) for _, m in self.batches]
        self.tokens = sum(int(m.sum()) for _, m in self.batches)
        self.shapes = [(ids.shape[0], ids.shape[1], run.geom.hidden) for ids, _ in self.batches]
        self.store, self.inputs, self.dense_final = None, None, None

    def capture(self) -> None:
        """The embeddings of the held-back windows, what layer 0 receives (again: a new pass starts)."""
        run = self.run
        if self.store is not None:
            self.store.close()
        where = "device" if run.offload["where"] == "device" else "host"
        self.store = ActivationStore(self.shapes, run.dtype, where, run.device)
        home = run.device if where == "device" else torch.device("cpu")
        self.inputs = capture_layer_inputs(run.source, self.batches, run.device, run.dtype, self.store, home)

    def dense_pass(self) -> list[torch.Tensor]:
        """The dense model's last hidden states over the held-back windows (one more read of every layer), for
        a prune whose allocation has no Fisher pass to keep them (a candidate measured against another)."""
        self.capture()
        for index, layer in self.run.layers("held-back windows: dense"):
            with self.run.timer.phase("calibrate"):
                self.run_layer(index, layer)
        return self.keep_dense_final()

    def keep_dense_final(self) -> list[torch.Tensor]:
        """The store's states, after a pass through the dense layers, as the dense model's last hidden states."""
        self.dense_final = [self.store.get(b).cpu() for b in range(len(self.store))]
        return self.dense_final

    def args(self, index: int, b: int):
        extra = self.inputs.get(b, index)
        return extra if self.store.where == "device" else _to(extra, self.run.device)

    def run_layer(self, index: int, layer) -> None:
        """Moves the store on through a resident layer (dense, or pruned inside the caller's view)."""
        for b in range(len(self.store)):
            args, kwargs = self.args(index, b)
            out = layer(self.store.get(b), *args, **kwargs)
            self.store.put(b, out[0] if isinstance(out, tuple) else out)

    def kl(self, others: tuple = ()) -> list[float]:
        """Mean over held-back tokens of KL(dense || pruned) of the next-token distributions, from the dense last
        hidden states kept by the Fisher pass and the store's (the pruned model's), then for each of `others`
        (another candidate's last hidden states there, `final()`): the dense logits, the costliest part on a
        large vocabulary, once for all. One sequence at a time: the vocabulary-wide tensors of a whole batch
        (8 x 512 x 49k floats, 0.8 GB each on SmolLM2) would set the process's peak memory."""
        run = self.run
        finals = [[self.store.get(b) for b in range(len(self.store))], *others]
        totals = [0.0] * len(finals)
        with head_of(run) as logits_of:
            for b in range(len(self.store)):
                dense_final = self.dense_final[b].to(run.device)
                for row in range(dense_final.shape[0]):
                    dense = torch.log_softmax(logits_of(dense_final[row]), -1)
                    probs = dense.exp()
                    mask = self.masks[b][row] if self.masks[b] is not None else None
                    for i, final in enumerate(finals):
                        pruned = torch.log_softmax(logits_of(final[b][row].to(run.device)), -1)
                        per_token = (probs * (dense - pruned)).sum(-1)
                        totals[i] += float(per_token[mask].sum() if mask is not None else per_token.sum())
        return [t / max(self.tokens, 1) for t in totals]

    def final(self) -> list[torch.Tensor]:
        """The store's last hidden states (after a pass through the pruned layers), on the host, for another
        candidate's kl() to measure beside its own."""
        return [self.store.get(b).cpu() for b in range(len(self.store))]

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


@contextmanager
def _output_grads(layer, spec, moe: bool, sums: dict):
    """Forward hooks on the modules whose outputs the structures write (o_proj; down_proj or the experts) that
    add the squared gradient of their output, per channel, into `sums` during the backward pass."""
    modules = {"o": spec.get(layer, spec.o),
               "mlp": layer.get_submodule(spec.moe.experts) if moe else spec.get(layer, spec.down)}
    if spec.post_norms is not None:  # what the block writes is the post-norm's output (obs._row_weights)
        modules = {"o": layer.get_submodule(spec.post_norms[0]), "mlp": layer.get_submodule(spec.post_norms[1])}
    handles = []
    for key, module in modules.items():
        def hook(_m, _args, out, key=key):
            out = out[0] if isinstance(out, tuple) else out
            if out.requires_grad:
                out.register_hook(lambda g: sums.__setitem__(key, sums.get(key, 0) +
                                                                 g.float().square().reshape(-1, g.shape[-1]).sum(0)))
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fisher_pass(run, held: HeldOut, seed: int, measured: HeldOut | None = None) -> list[LayerFisher]:
    """Per layer, the diagonal output Fisher of its attention and MLP outputs (see the module's docstring), on the
    windows of `held`; the forward pass also moves the windows of `measured` (the held-back ones, which the Fisher
    must not see) through the dense layers and keeps their last hidden states for the divergence after the
    prune."""
    layers = run.source.layers
    n, nb = len(layers), len(held.batches)
    held.capture()
    if measured is not None:
        measured.capture()
    elt = torch.empty((), dtype=run.dtype).element_size()
    total = n * sum(a * b * c for a, b, c in held.shapes) * elt
    where, _ = choose_offload("auto" if run.staging is not None else "host", total, torch.device("cpu"), 0)
    inputs = ActivationStore(held.shapes * n, run.dtype, where, torch.device("cpu"), run.staging)
    try:
        for index, layer in run.layers("KL yardstick: forward"):
            with run.timer.phase("calibrate"):
                for b in range(nb):
                    inputs.put(index * nb + b, held.store.get(b))
                held.run_layer(index, layer)
                if measured is not None:
                    measured.run_layer(index, layer)
        if measured is not None:
            measured.keep_dense_final()
        grads = _head_grads(run, held, seed)
        sums = [dict() for _ in range(n)]
        for index, layer in run.layers("KL yardstick: backward", reverse=True):
            with run.timer.phase("calibrate"), _no_param_grads(layer), torch.enable_grad(), \
                    _output_grads(layer, run.spec, run.moe_layers[index], sums[index]):
                for b in range(nb):
                    x = inputs.get(index * nb + b).detach().requires_grad_(True)
                    args, kwargs = held.args(index, b)
                    out = layer(x, *args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    out.backward(grads[b])
                    grads[b] = x.grad.detach()
    finally:
        inputs.close()
    zero = torch.zeros(run.geom.hidden)
    return [LayerFisher(o=(s.get("o", zero) / max(held.tokens, 1)).cpu(),
                        mlp=(s.get("mlp", zero) / max(held.tokens, 1)).cpu()) for s in sums]


@contextmanager
def _no_param_grads(layer):
    """Gradients flow to the inputs only, never into the weights."""
    params = [p for p in layer.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _head_grads(run, held: HeldOut, seed: int) -> list[torch.Tensor]:
    """Per batch, the gradient of the log-likelihood of next tokens sampled from the dense model's own
    distribution, with respect to the last hidden states (padding positions carry no loss); one sequence at a
    time, so that the logits of one sequence are the largest tensor."""
    gen = torch.Generator(device=run.device).manual_seed(seed)
    grads = []
    with head_of(run) as logits_of, _no_param_grads(run.model), torch.enable_grad():
        for b in range(len(held.batches)):
            h = held.store.get(b).detach().requires_grad_(True)
            for row in range(h.shape[0]):
                logp = torch.log_softmax(logits_of(h[row]), -1)
                sampled = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                picked = logp.gather(1, sampled).squeeze(1)
                if held.masks[b] is not None:
                    picked = picked * held.masks[b][row]
                picked.sum().backward()
            grads.append(h.grad.detach())
    return grads
