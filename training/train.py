"""Train one stage on DeepSpeed; started by DeepSpeed's launcher, one process per GPU (or per CPU rank).

    deepspeed --num_gpus 8 --module training.train --stage 3 --recipe training/recipes/paper-phi3 --output runs/phi3

The stage starts from the previous stage's export (stage_model.py), resumes from its latest checkpoint when
one exists, logs its loss curve, and ends by exporting its model folder (export.py). A stage whose export
exists is finished and is not run again.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1seg_core.errors import InvalidInputError
from r1seg_core.model.stages import trained_rows

from .data.prepared import open_source
from .data.samples import Collate, StageSamples, StepBatches
from .distributed import Ranks, barrier, init_distributed, mean_over_ranks, require_same_on_all_ranks
from .export import check_fingerprint, export_stage
from .logbook import Logbook
from .recipe import Recipe, StageConfig, load_recipe
from .run_layout import StagePaths
from .stage_model import (STAGE_NAMES, build_stage_model, enable_gradient_checkpointing, frozen_fingerprint,
                          set_training_mode)

LOSS_KEYS = ("loss", "loss_lm", "loss_dice", "loss_bce")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only; biases and norm scales are left alone (as the paper's HF Trainer did)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    # A matrix that trains only some rows (new token embeddings) must not decay: its other rows would shrink.
    decayed = [p for p in trained if p.ndim >= 2 and trained_rows(p) is None]
    return [{"params": decayed, "weight_decay": weight_decay},
            {"params": [p for p in trained if not any(p is d for d in decayed)], "weight_decay": 0.0}]


def samples_per_epoch(config: StageConfig, sources) -> int:
    if config.samples_per_epoch == "auto":
        return sum(source.pair_count() for source in sources)
    return int(config.samples_per_epoch)


def total_steps(config: StageConfig, per_epoch: int, samples_per_step: int) -> int:
    steps = max(1, math.ceil(config.epochs * per_epoch / samples_per_step))
    return min(steps, config.max_steps) if config.max_steps else steps


def deepspeed_config(recipe: Recipe, config: StageConfig) -> dict:
    return {**recipe.stage_deepspeed(config.stage), "train_micro_batch_size_per_gpu": config.micro_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation}


def stage_losses(model, batch: dict, stage: int) -> tuple[dict[str, torch.Tensor], int]:
    """The stage's losses for one micro-batch, and how many masks the decoder produced."""
    if stage == 1:
        _, losses = model.segment_with_text(batch["images"], batch["names"], batch["masks"])
        return {**losses, "loss_lm": losses["loss"].new_zeros(())}, len(batch["names"])
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"], batch["target_masks"])
    losses = {"loss": out.loss, "loss_lm": out.loss_lm, "loss_dice": out.loss_dice, "loss_bce": out.loss_bce}
    return losses, len(out.prompt_rows)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype if value.is_floating_point() else None, non_blocking=True)
        moved[key] = value
    return moved


def check_prepared_data(sources, model) -> None:
    for source in sources:
        if source.preprocess != model.config.preprocess:
            raise InvalidInputError(f"dataset {source.name!r} was prepared with {source.preprocess} but the model "
                                    f"expects {model.config.preprocess}: prepare it again for this recipe")


def save(engine, paths: StagePaths, step: int, keep: int, ranks: Ranks) -> None:
    # Frozen weights are rebuilt from the stage's starting point, so they are not written again at every save.
    engine.save_checkpoint(str(paths.checkpoints), tag=f"step{step:07d}", client_state={"step": step},
                           exclude_frozen_parameters=True)
    barrier()
    if ranks.is_main:
        tags = sorted(p for p in paths.checkpoints.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class StageRun:
    """One stage's engine and plan: `steps` optimizer steps of `samples_per_step` samples, from `start`."""
    engine: object
    scheduler: object
    dataset: StageSamples
    steps: int
    start: int
    per_epoch: int
    samples_per_step: int


def set_up(stage: int, recipe: Recipe, paths: StagePaths, data_dir: Path, ranks: Ranks) -> StageRun:
    """Model, data and DeepSpeed engine of a stage, resumed from its latest checkpoint when there is one."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    config = recipe.stages[stage]
    if config.threads:
        torch.set_num_threads(config.threads)
    model = build_stage_model(stage, recipe, paths.init, torch.bfloat16 if recipe.bf16(stage) else None)
    fingerprint = frozen_fingerprint(model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, stage)
    sources = [open_source(data_dir, name) for name in config.sources]
    check_prepared_data(sources, model)
    per_epoch = samples_per_epoch(config, sources)
    samples_per_step = config.micro_batch_size * config.gradient_accumulation * ranks.world
    steps = total_steps(config, per_epoch, samples_per_step)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=config.adam_betas, eps=config.adam_eps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * steps), steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(recipe, config))
    start = 0
    if (paths.checkpoints / "latest").is_file():
        check_fingerprint(fingerprint, paths)
        _, client = engine.load_checkpoint(str(paths.checkpoints), load_module_strict=False)
        start = client["step"]
        if ranks.is_main:
            print(f"[stage {stage}] resumed from step {start} of {steps}", flush=True)
    elif ranks.is_main:
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        paths.fingerprint.write_text(json.dumps(fingerprint))
    set_training_mode(engine.module)
    return StageRun(engine, scheduler, StageSamples(config, sources, model.window_size), steps, start, per_epoch,
                    samples_per_step)


def train(run: StageRun, config: StageConfig, paths: StagePaths, ranks: Ranks) -> None:
    stage, module = config.stage, run.engine.module
    dtype = next(module.parameters()).dtype
    collate = Collate(1) if stage == 1 else Collate(stage, module.tokenizer, module.num_visual_tokens, module.token_ids)
    keys = StepBatches(run.start, run.steps, config.gradient_accumulation, ranks.rank, config.micro_batch_size)
    batches = iter(torch.utils.data.DataLoader(run.dataset, batch_sampler=keys, collate_fn=collate,
                                               num_workers=config.num_workers, pin_memory=ranks.device.type == "cuda"))
    logbook = Logbook(paths.root, stage, run.start, run.steps, config.log_every_steps) if ranks.is_main else None
    if ranks.is_main:
        print(f"[stage {stage}] {STAGE_NAMES[stage]}: {run.steps} steps of {config.micro_batch_size} x "
              f"{config.gradient_accumulation} x {ranks.world} samples", flush=True)
    for step in range(run.start, run.steps):
        began = time.monotonic()
        # Dropout masks depend on (seed, step, rank) only, so a resumed run repeats the uninterrupted one.
        torch.manual_seed(config.seed * 1_000_003 + step * ranks.world + ranks.rank)
        totals = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=ranks.device)
        for _ in range(config.gradient_accumulation):
            batch = to_device(next(batches), ranks.device, dtype)
            with torch.autocast(ranks.device.type, dtype=torch.bfloat16, enabled=config.autocast_bf16):
                losses, masks = stage_losses(module, batch, stage)
            if stage >= 3:
                require_same_on_all_ranks(int(masks > 0), ranks.device, "whether the mask decoder runs")
            run.engine.backward(losses["loss"])
            run.engine.step()
            totals += torch.stack([losses[k].detach().double() for k in LOSS_KEYS])
        means = mean_over_ranks(totals / config.gradient_accumulation).tolist()
        done = step + 1
        if logbook is not None:
            grad_norm = run.engine.get_global_grad_norm()
            logbook.record({"step": done, "epoch": done * run.samples_per_step / run.per_epoch,
                            "samples": done * run.samples_per_step, **dict(zip(LOSS_KEYS, means)),
                            "lr": run.scheduler.get_last_lr()[0],
                            "grad_norm": float(grad_norm) if grad_norm is not None else None,
                            "seconds": time.monotonic() - began})
        if done % config.save_every_steps == 0 or done == run.steps:
            save(run.engine, paths, done, config.keep_checkpoints, ranks)
    if logbook is not None:
        logbook.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, type=int, choices=(1, 2, 3, 4))
    parser.add_argument("--recipe", required=True, type=Path, help="recipe folder (model, data, stage and DeepSpeed files)")
    parser.add_argument("--output", required=True, type=Path, help="the run folder (see run_layout.py)")
    parser.add_argument("--data", type=Path, help="prepared data folder (default: <output>/data)")
    parser.add_argument("--local_rank", type=int, help="set by the DeepSpeed launcher (LOCAL_RANK is used)")
    args = parser.parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    output = args.output.resolve()
    paths = StagePaths(output, args.stage)
    recipe = load_recipe(args.recipe)
    if (paths.export / "config.json").is_file():
        print(f"[stage {args.stage}] already finished: {paths.export}")
        return 0
    ranks = init_distributed()
    run = set_up(args.stage, recipe, paths, (args.data or output / "data").resolve(), ranks)
    train(run, recipe.stages[args.stage], paths, ranks)
    if ranks.is_main:
        folder = export_stage(recipe, paths)
        print(f"[stage {args.stage}] exported {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
