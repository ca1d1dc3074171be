"""torch.profiler over an engine's steps, for `tokmodel profile` and the server's /start_profile and /stop_profile.

While it runs, each phase of a step (schedule, prepare_inputs, forward, lm_head, sample, update, detokenize) and
each kernel call (kernel:<name>) is a named range (record_function), installed by wrapping the methods and the
layers' KernelOps in place and removed at stop, so an engine that is not profiled pays nothing. Each step's batch
(decode context lengths, prefill chunks) is kept on the host, so a report can compute what every kernel had to
move without reading the device. stop() writes the Chrome/Perfetto trace and, beside it, <trace>.steps.json."""
from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from kernels import KernelOps

if TYPE_CHECKING:
    from engine.engine_core import EngineCore
    from engine.scheduler import SchedulerOutput

KERNEL_PREFIX = "kernel:"


class EngineProfiler:
    def __init__(self, core: EngineCore, trace_dir: str | Path) -> None:
        self.core = core
        self.trace_dir = Path(trace_dir)
        self._profile: profile | None = None
        self._restore: list[Callable[[], None]] = []
        self._steps: list[dict] = []

    @property
    def running(self) -> bool:
        return self._profile is not None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("the profiler is already running")
        self._annotate()
        activities = [ProfilerActivity.CPU]
        if self.core.runner.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._steps = []
        self._profile = profile(activities=activities)
        self._profile.start()

    def stop(self) -> Path:
        """Stops, restores the engine and writes the trace; returns its path."""
        if not self.running:
            raise RuntimeError("the profiler is not running")
        self._profile.stop()
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / f"trace-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.json"
        self._profile.export_chrome_trace(str(path))
        self._profile = None
        Path(f"{path}.steps.json").write_text(json.dumps({"model": self._model_dims(), "steps": self._steps}))
        return path

    def _annotate(self) -> None:
        core, runner = self.core, self.core.runner
        for owner, attr, name in ((core, "step", "step"), (core.scheduler, "schedule", "schedule"),
                                  (runner, "_prepare_inputs", "prepare_inputs"), (runner.model, "forward", "forward"),
                                  (runner.model, "compute_logits", "lm_head"), (core.sampler, "sample", "sample"),
                                  (core.scheduler, "advance", "update"), (core.scheduler, "append_tokens", "update"),
                                  (core.output_processor, "process", "detokenize")):
            self._wrap(owner, attr, _annotated(getattr(owner, attr), name))
        self._wrap(runner, "execute_model", self._recording_batches(runner.execute_model))
        # The layers (the linear ones and the lm_head included), and the helpers they hold (PagedAttention), keep
        # the KernelOps chosen at build
        holders = [h for m in runner.model.modules() for h in (m, *vars(m).values())
                   if isinstance(getattr(h, "ops", None), KernelOps)]
        for holder in {id(h): h for h in holders}.values():
            self._wrap(holder, "ops", KernelOps(*(_annotated(fn, KERNEL_PREFIX + name)
                                                  for name, fn in holder.ops._asdict().items())))

    def _wrap(self, owner: object, attr: str, replacement: object) -> None:
        had_own = attr in vars(owner)
        original = getattr(owner, attr)
        setattr(owner, attr, replacement)
        self._restore.append(lambda: setattr(owner, attr, original) if had_own else delattr(owner, attr))

    def _recording_batches(self, execute_model: Callable) -> Callable:
        @functools.wraps(execute_model)
        def recorded(output: SchedulerOutput, *args):
            decodes, prefills = [], []
            for num_computed, num_new in zip(output.num_computed_tokens, output.num_scheduled_tokens):
                if num_new == 1:
                    decodes.append(num_computed + 1)
                else:
                    prefills.append([num_computed, num_new])
            self._steps.append({"decode_seq_lens": decodes, "prefills": prefills})
            with record_function("execute_model"):
                return execute_model(output, *args)

        return recorded

    def _model_dims(self) -> dict:
        runner, config = self.core.runner, self.core.runner.model.config
        num_heads = config.num_attention_heads
        return {"num_layers": config.num_hidden_layers, "num_heads": num_heads,
                "num_kv_heads": getattr(config, "num_key_value_heads", None) or num_heads,
                "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
                "hidden": config.hidden_size, "intermediate": config.intermediate_size, "vocab": config.vocab_size,
                "block_size": self.core.config.block_size, "elem": torch.tensor([], dtype=runner.dtype).element_size(),
                "device": str(runner.device), "dtype": str(runner.dtype).removeprefix("torch.")}


def _annotated(fn: Callable, name: str) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return run
