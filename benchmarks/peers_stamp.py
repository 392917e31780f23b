"""Run a training program and record when each of its optimiser steps ended (for peers.py).

    python benchmarks/peers_stamp.py STAMPS.json [--profile OUT.prof] -m MODULE ARGS...
    python benchmarks/peers_stamp.py STAMPS.json [--profile OUT.prof] SCRIPT.py ARGS...
    python benchmarks/peers_stamp.py STAMPS.json --original SCRIPT.py ARGS...

The same clock for every tool, with nothing of theirs edited: a global post-hook on
`torch.optim.Optimizer.step` (torch's `register_optimizer_step_post_hook`) stamps each step
with `time.time()`, per optimiser object; at exit the stamps go to STAMPS.json. A tool that
steps a throw-away optimiser before training (a speed probe) shows as a second optimiser, so
the one with the most steps is the training run's. Loader workers forked from the process
write nothing (only the process that started writes the file).

`--original` runs the original MLKD's mlkd.py on a CPU-only machine with fake CIFAR-10, changing
none of its files: it moves models and tensors with `.to(rank)` (CUDA device 0), so here a move
to a CUDA device goes to the CPU; and it asks torchvision for CIFAR-10 with download=True, whose
MD5 check of the real archive's files the fake files cannot pass, so that check answers yes.
"""

from __future__ import annotations

import atexit
import cProfile
import json
import os
import runpy
import sys
import time
from pathlib import Path


def main() -> None:
    """Install the hook, run the target as __main__, write the stamps at exit."""
    args = sys.argv[1:]
    out = Path(args.pop(0))
    profile_out = None
    if args[0] == "--profile":
        args.pop(0)
        profile_out = args.pop(0)
    if args[0] == "--original":
        args.pop(0)
        original_on_cpu()
    began = time.time()
    steps: dict[int, list[float]] = {}
    owner = os.getpid()

    from torch.optim.optimizer import register_optimizer_step_post_hook

    def stamp(optimizer: object, *_: object) -> None:
        steps.setdefault(id(optimizer), []).append(time.time())

    register_optimizer_step_post_hook(stamp)
    profiler = cProfile.Profile() if profile_out else None

    def write() -> None:
        if os.getpid() != owner:
            return
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_out)
        runs = sorted(steps.values(), key=len, reverse=True)
        out.write_text(
            json.dumps(
                {
                    "began": began,
                    "steps": runs[0] if runs else [],
                    "other_steps": sum(len(r) for r in runs[1:]),
                }
            )
        )

    atexit.register(write)
    if args[0] == "-m":
        target, argv0 = args[1], args[1]
        sys.argv = [argv0, *args[2:]]
        run = lambda: runpy.run_module(target, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        sys.argv = list(args)
        sys.path.insert(0, str(Path(args[0]).resolve().parent))
        run = lambda: runpy.run_path(args[0], run_name="__main__")  # noqa: E731
    if profiler is not None:
        profiler.enable()
    run()


def original_on_cpu() -> None:
    """What the original needs to run here: CUDA moves go to the CPU; fake CIFAR passes."""
    import importlib.machinery
    import importlib.util
    import types

    import timm  # noqa: F401  (loaded before any stand-in module exists)
    import torch
    from torchvision.datasets import cifar

    if importlib.util.find_spec("pandas") is None:
        stand_in = types.ModuleType("pandas", "stand-in: pandas is not installed")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("pandas", None)
        sys.modules["pandas"] = stand_in

    def on_cpu(arg: object) -> object:
        if isinstance(arg, int) and not isinstance(arg, bool):
            return "cpu"
        if isinstance(arg, (str, torch.device)) and str(arg).startswith("cuda"):
            return "cpu"
        return arg

    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to

    def tensor_to_cpu(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "device" in kwargs:
            kwargs["device"] = on_cpu(kwargs["device"])
        return tensor_to(self, *(on_cpu(a) for a in args), **kwargs)

    def module_to_cpu(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "device" in kwargs:
            kwargs["device"] = on_cpu(kwargs["device"])
        return module_to(self, *(on_cpu(a) for a in args), **kwargs)

    torch.Tensor.to = tensor_to_cpu
    torch.nn.Module.to = module_to_cpu
    cifar.check_integrity = lambda *args, **kwargs: True


if __name__ == "__main__":
    main()
