"""CUDA graphs of the quantized tower, one per batch bucket and segment.

At small batch the tower is launch-bound: ~10 kernel launches per block and milliseconds of Python
per forward. ``GraphedViT`` captures each piece of work once per batch bucket and replays it:

    segment "pool"        images -> embed -> blocks 1..depth -> the model's own head   (forward)
    segment "exit" j      x (or images, j = 0) -> blocks up to exit_layers[j] -> exit head,
                          gate features, gate scores, leave mask                       (classify)
    segment "final"       x (or images) -> the remaining blocks -> final head          (classify)

A batch of ``n`` rows runs in the graph of the smallest bucket ``>= n`` (default buckets
1, 2, 4, ..., 256; larger batches run in chunks of the largest): its rows are copied into the
graph's static input and the padding rows are zeroed. Padding is exact: every stage is row-local
(exact INT8 sums, per-token scales, per-sample attention and heads), so a row's result does not
depend on the rows beside it, real or padding. Between the segments of ``classify`` the host
reads one number per exit point (how many rows leave, the executor's one synchronisation),
compacts the rows that stay and hands them to the next segment's graph, of their own bucket.

A graph is captured the first time its (segment, bucket) is used, after two eager warm-up runs
(which also compile the Triton kernels and tune the GEMMs for that bucket: nothing is tuned while
capturing); ``warmup(batch_sizes)`` does it ahead of serving. Graphs capture the addresses of the
weights, the classifier and the policy's resident tensors: a new classifier, policy, logit scale,
device or activation dtype drops them all. The paper's per-tensor scheme is batch-dependent by
design, so it never runs in graphs. With ``capture=False`` (CPU, tests) the same static buffers,
padding and control flow run eagerly: what the graphs add is only the replay.
"""

from __future__ import annotations

import torch

from .executor import ClassifyResult
from .heads import exit_head, final_head
from .names import N_FEATURES

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Segment:
    """One (segment, bucket): static input, outputs, and the captured graph (or ``None``: eager)."""

    def __init__(self, fn, example: torch.Tensor, capture: bool):
        self.fn = fn
        self.input = torch.zeros_like(example)
        self.graph = None
        self.outputs = None
        if capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles, tunes, and lets the allocator settle before capture
                    fn(self.input)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = fn(self.input)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs' first ``len(x)`` rows (views of static buffers until the next ``run``)."""
        n = x.shape[0]
        self.input[:n].copy_(x)
        if n < self.input.shape[0]:
            self.input[n:].zero_()
        if self.graph is not None:
            self.graph.replay()
            outputs = self.outputs
        else:
            outputs = self.fn(self.input)
        return tuple(o[:n] for o in outputs)


class GraphedViT:
    """CUDA graphs of a ``QuantEarlyExitViT`` (see the module docstring); ``model.enable_cuda_graphs()``."""

    def __init__(self, model, buckets=DEFAULT_BUCKETS, capture: bool | None = None):
        buckets = tuple(sorted({int(b) for b in buckets}))
        if not buckets or buckets[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {buckets}")
        self.model, self.buckets = model, buckets
        self.capture = capture
        self._segments: dict[tuple, _Segment] = {}
        self._signature = None
        self.captures = 0  # segments built (tests, benchmarks)

    # ------------------------------------------------------------------ when graphs apply
    def _capturing(self) -> bool:
        return self.model.device.type == "cuda" if self.capture is None else bool(self.capture)

    def usable(self, images: torch.Tensor) -> bool:
        m = self.model
        if m.quant_config.act_quant == "paper" or images.shape[0] == 0:
            return False
        return not self._capturing() or m.device.type == "cuda"

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _check_signature(self):
        m = self.model
        held = (m.exit_policy, m.classifier)  # kept alive, so that their ids stay theirs
        sig = (str(m.device), m.act_dtype, m.resolved_backend, *map(id, held), m.logit_scale,
               m.class_embedding.data_ptr())
        if sig != self._signature:
            self._segments.clear()
            self._signature, self._held = sig, held

    def _segment(self, key: tuple, fn, example: torch.Tensor) -> _Segment:
        seg = self._segments.get(key)
        if seg is None:
            seg = self._segments[key] = _Segment(fn, example, self._capturing())
            self.captures += 1
        return seg

    def _run(self, kind: str, start: int, end: int, j: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = self.bucket(x.shape[0])
        key = (kind, start, end, j, b)
        if key not in self._segments:
            example = x.new_zeros((b, *x.shape[1:]))
            return self._segment(key, self._segment_fn(kind, start, end, j), example).run(x)
        return self._segments[key].run(x)

    def _segment_fn(self, kind: str, start: int, end: int, j: int):
        m = self.model
        ops, policy, text, scale = m.ops(), m.exit_policy, m.classifier, m.logit_scale

        def fn(inp):
            x = m.embed(inp, ops) if start == 0 else inp
            for i in range(start, end):
                x = m.run_block(i, x, ops)
            if kind == "pool":
                pooled, tokens = m.pool(x)
                return (pooled, tokens) if m.output_tokens else (pooled,)
            if kind == "final":
                return final_head(m, x, text, scale, ops.matmul_rows)
            logits, z = exit_head(m, ops.exit_head, x, text, scale, policy.head)
            feats = ops.gate_features(logits, x)
            scores = policy.gate_scores(j, feats)
            return x, logits, z, feats, scores, scores >= policy.resident(x.device)["threshold"][j]

        return fn

    def _chunks(self, images):
        return images.split(self.buckets[-1]) if images.shape[0] > self.buckets[-1] else [images]

    # ------------------------------------------------------------------ the model's two entry points
    def pool(self, images: torch.Tensor):
        """``model.pool(model.forward_tokens(images))`` through graphs: ``(pooled, tokens or None)``, fresh tensors."""
        self._check_signature()
        parts = [tuple(o.clone() for o in self._run("pool", 0, self.model.depth, -1, c.float()))
                 for c in self._chunks(images)]
        outs = [torch.cat(t) for t in zip(*parts)] if len(parts) > 1 else list(parts[0])
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def classify(self, images: torch.Tensor, return_gate: bool = False) -> ClassifyResult:
        """``run_early_exit`` through graphs: the same results, row for row."""
        self._check_signature()
        parts = [self._classify(c.float(), return_gate) for c in self._chunks(images)]
        return parts[0] if len(parts) == 1 else ClassifyResult.cat(parts)

    def _classify(self, images: torch.Tensor, return_gate: bool) -> ClassifyResult:
        m, policy = self.model, self.model.exit_policy
        text = m.classifier
        B, device = images.shape[0], images.device
        C, E, L = text.shape[0], text.shape[1], len(policy.exit_layers)
        logits_out = torch.full((B, C), float("nan"), device=device)
        emb_out = torch.full((B, E), float("nan"), device=device)
        exit_layer = torch.full((B,), m.depth, dtype=torch.int64, device=device)
        feats_out = torch.full((B, L, N_FEATURES), float("nan"), device=device) if return_gate else None
        scores_out = torch.full((B, L), float("nan"), device=device) if return_gate else None
        active, x, start = torch.arange(B, device=device), images, 0
        for j, layer in enumerate(policy.exit_layers):
            x_out, logits, z, feats, scores, leave = self._run("exit", start, layer, j, x)
            start = layer
            if return_gate:
                feats_out[active, j] = feats
                scores_out[active, j] = scores
            n_leave = int(leave.sum())  # the one host synchronisation of this exit point
            if n_leave == 0:
                x = x_out
                continue
            n_stay = x_out.shape[0] - n_leave
            order = torch.argsort(leave.to(torch.int8), stable=True)  # staying rows first, in order
            stay, go = order[:n_stay], order[n_stay:]
            rows = active[go]
            logits_out.index_copy_(0, rows, logits.index_select(0, go))
            emb_out.index_copy_(0, rows, z.index_select(0, go))
            exit_layer.index_fill_(0, rows, layer)
            active, x = active[stay], x_out.index_select(0, stay)
            if n_stay == 0:
                break
        if active.numel():
            logits, z = self._run("final", start, m.depth, -1, x)
            logits_out.index_copy_(0, active, logits)
            emb_out.index_copy_(0, active, z)
        return ClassifyResult(logits_out, emb_out, exit_layer, feats_out, scores_out)

    @torch.no_grad()
    def warmup(self, batch_sizes=None, classify: bool = True) -> int:
        """Capture ahead of serving: the full-depth graph of every bucket (``batch_sizes``: the buckets
        they fall in) and, with a classifier set and ``classify``, every exit segment's; returns how
        many segments were built."""
        m = self.model
        before = self.captures
        sizes = sorted({self.bucket(min(int(n), self.buckets[-1])) for n in (batch_sizes or self.buckets)})
        h, w = m.image_size
        for b in sizes:
            images = torch.zeros(b, 3, h, w, device=m.device)
            self.pool(images)
            if classify and m.classifier is not None:
                self._check_signature()
                x = m.embed(images, m.ops()).to(m.act_dtype)
                start = 0
                for j, layer in enumerate(m.exit_policy.exit_layers):  # every row stays: each segment at b
                    self._run("exit", start, layer, j, images if start == 0 else x)
                    start = layer
                self._run("final", start, m.depth, -1, images if start == 0 else x)
        return self.captures - before
