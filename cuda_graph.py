"""A training step replayed from a CUDA graph: GraphedStep, and what its capture needs.

GraphedStep replays a training step (forward, backward, Adam) from a CUDA graph; a capture that raises
or whose first replay is wrong is dropped, and that batch size goes on eagerly from the same state
(training_state and restore_training_state put the warm-up's changes back; plain_adam makes Adam plain
again when no graph is left). speed.py decides whether a run uses it; steps.py builds it.
"""
import sys
from contextlib import nullcontext

import torch


def training_state(model, optimizer):
    """A copy of everything a training step changes: weights, BatchNorm buffers, Adam's state."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()})


def restore_training_state(model, optimizer, saved):
    """Copy `saved` back in place (a captured graph holds these very tensors). Adam state created
    since is zeroed: Adam starts from zeros, so that equals no state at all."""
    weights, adam = saved
    for k, v in model.state_dict().items():
        v.copy_(weights[k])
    for p, s in optimizer.state.items():
        for k, v in s.items():
            v.copy_(adam[p][k]) if k in adam.get(p, ()) else v.zero_()


def capture_graph(graph, step, stream, pool):
    """step()'s outputs, its CUDA work captured into `graph` on `stream`, sharing the memory `pool`.

    However the capture ends, the stream that was current before is current again, and the error
    raised is the first one. torch.cuda.graph alone does neither: when the step raises inside the
    capture, its __exit__ calls capture_end(), which raises "operation failed due to a previous error
    during capture" over the step's error, and then never leaves its stream context (torch 2.14,
    torch/cuda/graphs.py), so the capture stream would stay current for everything after."""
    first = []
    with torch.cuda.stream(stream):  # put back on the way out, whatever torch.cuda.graph leaves behind
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                try:
                    return step()
                except Exception as err:
                    first.append(err)
                    raise
        except Exception as err:
            if first and first[0] is not err:
                raise first[0] from None  # the cause, not capture_end's "a previous error"
            raise


def plain_adam(optimizer):
    """Capturable Adam (make_optimizer's for a graph) made plain again, in place, as it is built for an
    eager run: capturable off, each lr a float, each step count a CPU tensor. Capturable Adam also runs
    eagerly, but computes with its lr and step count on the device, extra kernels every step."""
    for group in optimizer.param_groups:
        group["capturable"] = False
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].item()
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].cpu()


class GraphedStep:
    """step(x, y) -> (loss, number correct), replayed from a CUDA graph: one graph launch a step instead
    of hundreds of kernel launches. (Not yet run on a GPU: none was lent where this was written;
    tests/test_cuda.py and gpu_check.sh are ready for the first.)

    A graph has fixed shapes and addresses, so there is one graph per batch size (an epoch's partial
    last batch gets its own), each with static input and label buffers that a call copies the batch
    into. The first call of a size captures it: a few eager warm-up steps (Adam's state, cuDNN's
    choices), then the capture, both on the one side stream this GraphedStep keeps (graphs share a
    memory pool only when captured on the same stream: the allocator gives no stream the blocks another
    freed, so a second stream would make the partial batch's graph allocate its own), then every weight,
    BatchNorm buffer and Adam state is put back as it was, so the warm-up leaves no trace, and the
    graph's first replay is this call's step. That replay is checked against the first warm-up step, an
    eager step from the same state on the same batch.

    A capture that raises (its first error is told, see capture_graph), or a replay that fails the
    check, is dropped with one line (say) and the state put back: that batch size runs eagerly from then
    on, and the other sizes keep their graphs. When no graph is left (the first capture failed: the full
    batch's, without which graphing the small last batch is not worth it), every later step runs
    eagerly and Adam is made plain again (plain_adam). Either way the run loses nothing.

    The optimizer must be capturable Adam with a tensor lr (steps.make_optimizer(..., cuda_graph=True)).
    The graph reads that lr tensor: it is held, and a call that finds another object in the param group
    (a scheduler that replaced it) copies the new value into the held one and puts it back. The graphs
    share one memory pool; their outputs are the graph's buffers, overwritten by the next call (a caller
    copies them before then, as train.py does), so sharing is safe in any replay order. On a CPU (tests)
    _record returns the step itself, run eagerly on the static buffers where CUDA would replay the
    graph, so everything but the capture itself is exercised there.
    """

    WARMUP = 3
    # |graph update - eager update| / |eager update| allowed: a graph that skips or repeats the update,
    # or reads a stale lr or input, is off by ~1 or more; rounding by far less
    TOLERANCE = 0.1

    def __init__(self, step, model, optimizer, say=None):
        self.step, self.model, self.optimizer = step, model, optimizer
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.graphs = {}      # batch size -> (static input, static labels, replay)
        self.eager = {}       # batch size -> why its graph was dropped, while other sizes keep theirs
        self.dropped = None   # why the last graph went, once none is left: then every step is eager
        # the lr tensors the graphs read (a float lr, on the plain optimizer a CPU test may use, is not read)
        self.lrs = [group["lr"] if isinstance(group["lr"], torch.Tensor) else None for group in optimizer.param_groups]
        self.pool = None
        self.stream = None    # the side stream of every warm-up and capture (CUDA only)

    def __call__(self, x, y):
        if self.dropped is not None:
            return self.step(x, y)
        self.hold_lr()
        if len(y) in self.eager:
            return self.step(x, y)
        if len(y) not in self.graphs:
            return self.capture(x, y)
        static_x, static_y, replay = self.graphs[len(y)]
        static_x.copy_(x)
        static_y.copy_(y)
        return replay()

    def hold_lr(self):
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            if lr is not None and group["lr"] is not lr:
                lr.copy_(group["lr"]) if isinstance(group["lr"], torch.Tensor) else lr.fill_(group["lr"])
                group["lr"] = lr

    def side_stream(self, device):
        """The one stream this step warms up and captures on, made on `device` (not the current
        device's: on cuda:1 a stream of cuda:0 would capture nothing); None on a CPU."""
        if device.type != "cuda":
            return None
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def _record(self, step, device):
        """replay() -> step's outputs: a CUDA graph of step captured on the side stream, sharing one
        pool with the other sizes' graphs; on a CPU, step itself."""
        if device.type != "cuda":
            return step
        stream = self.side_stream(device)
        with torch.cuda.device(device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            stream.wait_stream(torch.cuda.current_stream(device))
            outputs = capture_graph(graph, step, stream, self.pool)
            torch.cuda.current_stream(device).wait_stream(stream)

        def replay():
            graph.replay()
            return outputs
        return replay

    def capture(self, x, y):
        static_x, static_y = x.clone(), y.clone()  # clone keeps x's memory format

        def step():
            return self.step(static_x, static_y)

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved = training_state(self.model, self.optimizer)
        side = self.side_stream(x.device)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side) if side is not None else nullcontext():
            for i in range(self.WARMUP):
                step()
                if i == 0:
                    eager = [p.detach().clone() for p in params]
        if side is not None:
            torch.cuda.current_stream(x.device).wait_stream(side)
            torch.cuda.empty_cache()  # the warm-up's activations go back, so the graph's pool can take them
        self.optimizer.zero_grad(set_to_none=True)  # backward then allocates .grad from the graph's pool
        try:
            replay = self._record(step, x.device)
            restore_training_state(self.model, self.optimizer, saved)
            result = replay()  # this call's step
            error, update = self.replay_error(params, eager, saved[0])
            if error > self.TOLERANCE * update:  # one host sync per graph, once a run
                raise RuntimeError(f"its first replay updates the weights unlike the eager step (relative "
                                   f"difference {(error / update).item():.3g})")
        except Exception as err:  # noqa: BLE001 - any failure of the capture means: this size trains eagerly
            return self.drop(len(y), f"the CUDA graph for batch size {len(y)} was dropped ({type(err).__name__}: "
                                     f"{' '.join(str(err).split())[:200]})", saved, x, y)
        self.graphs[len(y)] = static_x, static_y, replay
        return result

    def replay_error(self, params, eager, before):
        """(|replayed weights - eager step's weights|, |eager step's update|), over every parameter."""
        names = {p: n for n, p in self.model.named_parameters()}
        update = sum(((e - before[names[p]]) ** 2).sum() for p, e in zip(params, eager)).sqrt()
        error = sum(((p.detach() - e) ** 2).sum() for p, e in zip(params, eager)).sqrt()
        return error, update

    def drop(self, size, why, saved, x, y):
        """After a failed capture of batch size `size`: the state put back, the line told, the step eager."""
        self.optimizer.zero_grad(set_to_none=True)  # no .grad left pointing into a graph's pool
        restore_training_state(self.model, self.optimizer, saved)
        if self.graphs:
            kept = sorted(self.graphs)
            why += (f"; its steps run eagerly, and batch size {kept[0]} keeps its graph" if len(kept) == 1 else
                    f"; its steps run eagerly, and batch sizes {', '.join(map(str, kept))} keep their graphs")
            self.eager[size] = why
        else:
            self.dropped = why = why + "; training goes on eagerly from the same state"
            plain_adam(self.optimizer)
        self.say(why)
        return self.step(x, y)
