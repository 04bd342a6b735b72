"""The one training loop: every `jointregseg train` strategy (the seed methods, synthesis, the learned
affine) and `finetune` run through `train()`. The strategy (training/strategies/) supplies the data, the
starting model, the step plan, the optimisers and the updates; the loop owns the order of steps, the
log and loss curve, checkpoints, resuming after a stop, and torch DDP under torchrun."""
from __future__ import annotations

import copy
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from ..models.checkpoint import load_model, save_model
from ..core.device import resolve_device
from ..core.errors import JointRegSegError
from ..core.progress import Reporter
from .training_log import open_training_log, write_loss_curve
from .strategies import PAPERS, STRATEGIES


class _TrainingStep(nn.Module):
    """Holds every trained network so torch DDP can wrap them together; `forward(compute)` runs one
    strategy update, so each DDP forward is followed by exactly one backward."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, compute):
        return compute()


def _distributed(device):
    """(rank, world_size, device) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return 0, 1, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), world, dev


def _check_replicas_agree(net: nn.Module, dev) -> None:
    checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in net.parameters())],
                            dtype=torch.float64, device=dev)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if float(high - low) > 1e-6 * max(1.0, abs(float(checksum))):
        raise JointRegSegError(f"distributed training: replicas diverged (parameter checksums {float(low)} "
                               f"vs {float(high)})")


def _save_auxiliary(modules: dict[str, nn.Module], path: Path) -> None:
    tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _load_auxiliary(modules: dict[str, nn.Module], path: Path) -> None:
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def train(config: dict, data_dir, out_path, init=None, device="auto", progress=None, cancel=None) -> Path:
    """Train (or fine-tune from `init`) with `config["strategy"]` and write a checkpoint with its card.

    Resumable: every `checkpoint_every` steps `<out>.partial.safetensors`, `<out>.aux.safetensors`
    (training-only networks) and `<out>.state.json` are written; a later call with the same arguments
    continues from there (optimiser state restarts). `<out>.log.csv` has a row per update and
    `<out>.loss-curve.png` its curves. Under `torchrun` (WORLD_SIZE > 1) the networks are wrapped in
    torch DDP, each process samples its own pairs and rank 0 writes every file.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    strategy_name = config.get("strategy", "deepatlas")
    if strategy_name not in STRATEGIES:
        raise JointRegSegError(f"unknown training strategy {strategy_name!r}; available: {sorted(STRATEGIES)}")
    strategy_class = STRATEGIES[strategy_name]
    rank, world, dev = _distributed(device)
    reporter = Reporter(progress if rank == 0 else None, cancel)
    seed = int(config.get("seed", 0))
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    data = strategy_class.load_data(config, data_dir, dev)
    partial = out_path.with_suffix(".partial.safetensors")
    aux_path = out_path.with_suffix(".aux.safetensors")
    state_path = out_path.with_suffix(".state.json")
    start = 0
    if partial.is_file() and state_path.is_file():
        model = load_model(partial, dev)
        start = json.loads(state_path.read_text(encoding="utf-8"))["next_step"]
    else:
        model = strategy_class.build_model(config, data, init, dev, seed)
    net = model.network.to(dev).train()
    strategy = strategy_class.create(config, model, data)
    auxiliary = strategy.auxiliary()
    for module in auxiliary.values():
        module.to(dev).train()
    if start and auxiliary and aux_path.is_file():
        _load_auxiliary(auxiliary, aux_path)
    stepper = _TrainingStep({"model": net, **auxiliary})
    runner = stepper if world == 1 else DistributedDataParallel(
        stepper, find_unused_parameters=True, broadcast_buffers=False)
    optimizers = strategy.optimizers()
    plan = strategy.plan()
    log_path = out_path.with_suffix(".log.csv")
    log, writer = open_training_log(log_path, start) if rank == 0 else (None, None)
    rng = strategy.make_rng(seed, start, rank)
    checkpoint_every = int(config.get("checkpoint_every", strategy.checkpoint_every))
    began = time.perf_counter()
    try:
        for step in range(start, len(plan)):
            phase, index = plan[step]
            strategy.before_step(step, len(plan), optimizers, rng)
            for key, label, compute in strategy.updates(phase, index, rng):
                stepper.zero_grad(set_to_none=True)
                terms = runner(compute)
                terms["loss"].backward()
                optimizers[key].step()
                if writer:
                    values = {k: round(float(v.detach()), 5) for k, v in terms.items() if k != "loss"}
                    writer.writerow([step, label, f"{float(terms['loss'].detach()):.5f}", json.dumps(values),
                                     f"{time.perf_counter() - began:.1f}"])
            reporter.update(f"train {phase}", (step + 1) / len(plan))
            if rank == 0 and ((step + 1) % checkpoint_every == 0 or step + 1 == len(plan)):
                log.flush()
                save_model(model, partial)
                if auxiliary:
                    _save_auxiliary(auxiliary, aux_path)
                state_path.write_text(json.dumps({"next_step": step + 1, "of": len(plan)}), encoding="utf-8")
    finally:
        if log:
            log.close()
    net.eval()
    if world > 1:
        _check_replicas_agree(net, dev)
    if rank == 0:
        record = {"strategy": strategy_name, "config": copy.deepcopy(config), "paper": PAPERS[strategy_name],
                  "seconds_this_run": round(time.perf_counter() - began, 1), "device": str(dev), "world_size": world}
        strategy.finish(model, data_dir, record)
        save_model(model, out_path)
        write_loss_curve(log_path, out_path.with_suffix(".loss-curve.png"))
        for leftover in (partial, aux_path, state_path):
            leftover.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    return out_path
