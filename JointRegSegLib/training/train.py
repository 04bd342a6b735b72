"""The training loop shared by every strategy (the strategies package supplies the losses and updates):
pretrain registration, pretrain segmentation, then joint training; resumable, logged, and
distributed with torch DDP under torchrun."""
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

from ..models.checkpoint import load_model, new_model, save_model
from ..core.device import resolve_device
from ..core.errors import JointRegSegError
from ..core.progress import Reporter
from .dataset import FewShotData, load_fewshot
from .training_log import open_training_log
from .strategies import PAPERS, STRATEGIES


def default_card(config: dict, data: FewShotData) -> dict:
    return {
        "name": config["name"], "description": config.get("description", ""),
        "architecture": config["architecture"], "labels": data.manifest["label_table"],
        "modality": data.manifest.get("modality", "unknown"), "intensity": config["intensity"],
        "working_grid": {**data.manifest["working_grid"], "center": "mass"},
        "segment_foreground_only": bool(config.get("segment_foreground_only", False)),
        "refinement": config.get("refinement", {"similarity": "lncc", "smoothness": 1.0, "learning_rate": 0.05}),
    }


def describe_data(data: FewShotData) -> str:
    """The training data in words, counted from the manifest (not a fixed sentence)."""
    items = {e["name"]: e for e in data.manifest["items"]}

    def part(names: list) -> str:
        synthetic = sum(bool(items[n].get("synthetic")) for n in names)
        sources = sorted({str(items[n].get("source", "unknown")) for n in names})
        return f"{len(names)} ({len(names) - synthetic} real, {synthetic} synthetic; from {', '.join(sources) or 'none'})"

    grid = data.manifest.get("working_grid", {})
    text = (f"Training images: {part(data.train)}, of which {len(data.labelled)} with labels used in training "
            f"({', '.join(data.labelled) or 'none'}) and {len(data.train) - len(data.labelled)} without. "
            f"Validation images: {part(data.val)}, labels for evaluation only. "
            f"Modality {data.manifest.get('modality', 'unknown')}; working grid {grid.get('size')} voxels of "
            f"{grid.get('spacing')} mm.")
    return f"{text} {data.manifest['notes']}" if data.manifest.get("notes") else text


def _schedule(config: dict) -> list[tuple[str, int]]:
    """(phase, index) for every step: registration pretraining, segmentation pretraining, joint training."""
    steps = config["steps"]
    return [(phase, i) for phase in ("reg_pretrain", "seg_pretrain", "joint") for i in range(int(steps.get(phase, 0)))]


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
    continues from there (optimiser state restarts). Under `torchrun` (WORLD_SIZE > 1) the networks are
    wrapped in torch DDP, each process samples its own pairs and rank 0 writes every file.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    strategy_name = config.get("strategy", "deepatlas")
    if strategy_name not in STRATEGIES:
        raise JointRegSegError(f"unknown training strategy {strategy_name!r}; available: {sorted(STRATEGIES)}")
    rank, world, dev = _distributed(device)
    reporter = Reporter(progress if rank == 0 else None, cancel)
    seed = int(config.get("seed", 0))
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    data = load_fewshot(data_dir, config["intensity"], dev)
    if not data.labelled:
        raise JointRegSegError(f"{data_dir}: no labelled training image; joint training needs at least one")
    partial = out_path.with_suffix(".partial.safetensors")
    aux_path = out_path.with_suffix(".aux.safetensors")
    state_path = out_path.with_suffix(".state.json")
    start = 0
    if partial.is_file() and state_path.is_file():
        model = load_model(partial, dev)
        start = json.loads(state_path.read_text(encoding="utf-8"))["next_step"]
    elif init is not None:
        model = load_model(init, dev)
        model.card = {**model.card, "parent": {"name": model.card.get("name"), "path": str(init),
                                               "weights_sha256": model.card.get("weights_sha256")}}
        model.card.update({k: v for k, v in default_card(config, data).items() if k not in ("architecture",)})
    else:
        model = new_model(default_card(config, data), seed=seed)
    net = model.network.to(dev).train()
    strategy = STRATEGIES[strategy_name](config, net, data)
    auxiliary = strategy.auxiliary()
    for module in auxiliary.values():
        module.to(dev).train()
    if start and auxiliary and aux_path.is_file():
        _load_auxiliary(auxiliary, aux_path)
    stepper = _TrainingStep({"model": net, **auxiliary})
    runner = stepper if world == 1 else DistributedDataParallel(
        stepper, find_unused_parameters=True, broadcast_buffers=False)
    optimizers = strategy.optimizers()
    plan = _schedule(config)
    log_path = out_path.with_suffix(".log.csv")
    log, writer = open_training_log(log_path, start) if rank == 0 else (None, None)
    rng = random.Random(seed + start + 1_000_003 * rank)
    began = time.perf_counter()
    try:
        for step in range(start, len(plan)):
            phase, index = plan[step]
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
            if rank == 0 and (step + 1) % int(config.get("checkpoint_every", 100)) == 0:
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
        from .evaluate import evaluate_pairs
        model.card["training"] = {
            "strategy": strategy_name, "config": copy.deepcopy(config), "paper": PAPERS[strategy_name],
            "implements": " ".join((type(strategy).__doc__ or "").split()),
            "seconds_this_run": round(time.perf_counter() - began, 1), "device": str(dev), "world_size": world,
            "labelled_images": data.labelled, "unlabelled_images": len(data.train) - len(data.labelled),
        }
        model.card["data"] = {"folder": str(data_dir), "sources": data.manifest["sources"],
                              "notes": data.manifest["notes"], "seed": data.manifest["seed"],
                              "summary": describe_data(data)}
        model.card["metrics"] = evaluate_pairs(model, data)
        save_model(model, out_path)
        for leftover in (partial, aux_path, state_path):
            leftover.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    return out_path
