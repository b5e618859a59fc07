"""A whole training step as one CUDA graph, run by MONAI's ``SupervisedTrainer`` (issue 7).

UltraLightUNet3D's step is hundreds of small kernels (three depth-wise branches per MKDC, BatchNorm, ReLU6, 1×1
convolutions, attention gates), so on a fast GPU the CPU cannot launch them as fast as the GPU runs them: the compiled
step spends 27.6 ms in kernels inside 53 ms of wall time (``benchmarks/results/profile_cuda_h100_triton_compile_*``).
Capturing forward, DiceCE loss, backward and the AdamW update once and replaying the graph removes the launch cost.

:class:`CUDAGraphStep` is an ``iteration_update`` for :class:`monai.engines.SupervisedTrainer`: the trainer, its
events, handlers, validation and checkpoints stay MONAI's; only the body of the iteration changes. The first
``warmup`` iterations run eagerly on a side stream (cuDNN picks its algorithms, ``torch.compile`` compiles, the
optimizer allocates its state), the next one is captured, and from then on each iteration copies its batch into the
graph's static input tensors and replays. These are ordinary training iterations on real batches: none is skipped.

Requirements, checked with one clear error: a CUDA device, batches of one fixed shape (ul3d's patch sampler gives
that), and an optimizer built with :func:`conform_optimizer` (``capturable=True`` and the learning rate as a device
tensor, so the scheduler's updates reach the captured ``AdamW`` kernels). Mixed precision is bf16 autocast, which
needs no loss scaling (a ``GradScaler``'s skipped steps cannot be expressed in a static graph).
"""

from __future__ import annotations

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

__all__ = ["CUDAGraphStep", "conform_optimizer"]


def conform_optimizer(optimizer: torch.optim.Optimizer, capturable: bool, device: torch.device) -> None:
    """Make ``optimizer`` fit (``capturable=True``) or not fit for CUDA-graph capture, in place.

    Capturable: each group's ``lr`` becomes a 0-dim tensor on ``device`` (an LR scheduler then fills it in place, which
    a replayed graph sees; a Python float would be frozen into the graph) and every ``step`` counter moves to the
    device. Not capturable: ``lr`` back to a float and ``step`` to the CPU. Used after building the optimizer and after
    ``load_state_dict`` (a checkpoint written in the other mode is then resumed correctly).
    """
    for group in optimizer.param_groups:
        lr = group["lr"]
        value = float(lr.item()) if torch.is_tensor(lr) else float(lr)
        if capturable:
            group["lr"] = torch.tensor(value, dtype=torch.float32, device=device)
        else:
            group["lr"] = value
        if "capturable" in group:
            group["capturable"] = capturable
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.to(device=device if capturable else "cpu", dtype=torch.float32)


class CUDAGraphStep:
    """``iteration_update`` of a :class:`~monai.engines.SupervisedTrainer` replaying one captured training step.

    Args:
        warmup: eager iterations before the capture (at least 1: the optimizer state must exist when capturing).
        amp_dtype: autocast dtype when the trainer's ``amp`` is on (bf16: no loss scaling needed).
    """

    def __init__(self, warmup: int = 3, amp_dtype: torch.dtype = torch.bfloat16) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1, got {warmup}")
        self.warmup = warmup
        self.amp_dtype = amp_dtype
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.eager_steps = 0

    @staticmethod
    def _plain(t: torch.Tensor) -> torch.Tensor:
        return t.as_tensor() if hasattr(t, "as_tensor") else t  # MetaTensor -> Tensor (static buffers are plain)

    def _step(self, engine, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=bool(engine.amp)):
            pred = engine.inferer(inputs, engine.network)
            loss = engine.loss_function(pred, targets).mean()
        loss.backward()
        engine.optimizer.step()
        return pred, loss

    def _check(self, engine, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if inputs.device.type != "cuda":
            raise RuntimeError(f"CUDA-graph training needs a CUDA device; the batch is on {inputs.device}")
        if self.graph is not None:
            for name, t in (("image", inputs), ("label", targets)):
                ref = self.static[name]
                if t.shape != ref.shape or t.dtype != ref.dtype:
                    raise RuntimeError(
                        f"CUDA-graph training needs batches of one shape: the captured step has {name} "
                        f"{tuple(ref.shape)} {ref.dtype}, iteration {engine.state.iteration} brought {tuple(t.shape)} "
                        f"{t.dtype} (set train.cuda_graph=false for varying batch shapes)")
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise RuntimeError("CUDA-graph training does not support gradient accumulation")

    def __call__(self, engine, batchdata) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = (self._plain(t) for t in batch[:2])
        self._check(engine, inputs, targets)
        engine.network.train()
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        if self.graph is None and self.eager_steps < self.warmup:
            side = torch.cuda.Stream(device=inputs.device)
            side.wait_stream(torch.cuda.current_stream(inputs.device))
            with torch.cuda.stream(side):
                engine.optimizer.zero_grad(set_to_none=True)
                pred, loss = self._step(engine, inputs, targets)
            torch.cuda.current_stream(inputs.device).wait_stream(side)
            self.eager_steps += 1
        else:
            if self.graph is None:
                self._capture(engine, inputs, targets)
            else:
                self.static["image"].copy_(inputs, non_blocking=True)
                self.static["label"].copy_(targets, non_blocking=True)
            self.graph.replay()
            # clones: the next replay overwrites the static outputs, handlers may read these later
            pred, loss = self.static["pred"].detach().clone(), self.static["loss"].detach().clone()

        engine.state.output[Keys.PRED] = pred.detach()
        engine.state.output[Keys.LOSS] = loss.detach()
        for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                      IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
            engine.fire_event(event)
        return engine.state.output

    def _capture(self, engine, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        for group in engine.optimizer.param_groups:
            if not group.get("capturable", False) or not torch.is_tensor(group["lr"]):
                raise RuntimeError("CUDA-graph training needs a capturable optimizer with a tensor learning rate "
                                   "(ul3d.engine.graphed.conform_optimizer)")
        self.static = {"image": inputs.clone(), "label": targets.clone()}
        torch.cuda.synchronize(inputs.device)
        engine.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated in the graph's memory pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: a loader thread may use the GPU (cached volumes, data.cache_device=cuda) during the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            pred, loss = self._step(engine, self.static["image"], self.static["label"])
        self.static.update(pred=pred, loss=loss)
        self.graph = graph  # capture records without running: the caller replays for this iteration
