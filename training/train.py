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
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1seg_core.errors import CheckpointError, InvalidInputError
from r1seg_core.model.stages import trained_rows

from .data.prepared import open_source
from .data.samples import Collate, StageSamples, StepBatches
from .distributed import Ranks, barrier, init_distributed, max_over_ranks, mean_over_ranks, require_same_on_all_ranks
from .export import check_fingerprint, export_stage
from .logbook import Logbook
from .recipe import Recipe, StageConfig, load_recipe
from .run_layout import StagePaths
from .stage_model import (STAGE_NAMES, Stage1Prompts, build_stage_model, enable_gradient_checkpointing,
                          frozen_fingerprint, set_training_mode)
from .validation import VALIDATED_STAGES, Validator, check_held_out, validation_samples

LOSS_KEYS = ("loss", "loss_lm", "loss_dice", "loss_bce", "loss_align")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only; biases and norm scales are left alone (as the paper's HF Trainer did)."""
    def decays(p: torch.nn.Parameter) -> bool:
        # A matrix that trains only some rows (new token embeddings) must not decay: its other rows would shrink.
        return p.ndim >= 2 and trained_rows(p) is None

    trained = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trained if decays(p)], "weight_decay": weight_decay},
            {"params": [p for p in trained if not decays(p)], "weight_decay": 0.0}]


def samples_per_epoch(config: StageConfig, sources) -> int:
    """The samples of one epoch (the recipe's `samples_per_epoch`).

    "auto": the (case, structure) pairs present in the prepared cases. "original": what the released code's epoch
    held (model_anchors.md §4.2, §1.8): M3D's per-dataset json lists one entry per (case, class) pair, absent classes
    kept (a zero mask), so every structure the dataset annotates counts in every case; and stages 2-4 concatenated
    each dataset twice, once asking by class name and once by description (stage 2's CaptionSegDataset, stages 3-4's
    MultiSegDataset), while stage 1 used one prompt template. Stage 2's RefSeg captions, which this project has no
    reader for, are not counted.
    """
    if config.samples_per_epoch == "auto":
        return sum(source.pair_count() for source in sources)
    if config.samples_per_epoch == "original":
        prompt_variants = 1 if config.stage == 1 else 2
        return prompt_variants * sum(source.annotated_pair_count() for source in sources)
    return int(config.samples_per_epoch)


def total_steps(config: StageConfig, per_epoch: int, samples_per_step: int) -> int:
    steps = max(1, math.ceil(config.epochs * per_epoch / samples_per_step))
    return min(steps, config.max_steps) if config.max_steps else steps


def deepspeed_config(recipe: Recipe, config: StageConfig) -> dict:
    return {**recipe.stage_deepspeed(config.stage), "train_micro_batch_size_per_gpu": config.micro_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation}


def stage_losses(model, batch: dict, stage: int, anchors: Stage1Prompts | None = None,
                 alignment: float = 0.0) -> tuple[dict[str, torch.Tensor], int]:
    """The stage's losses for one micro-batch, and how many masks the decoder produced.

    With `anchors` (stage 1's prompt per structure), `alignment` weighs the squared distance of each [SEG] prompt
    from its target's anchor, averaged over the prompts."""
    if stage == 1:
        _, losses = model.segment_with_text(batch["images"], batch["names"], batch["masks"], rows=batch["rows"])
        zero = losses["loss"].new_zeros(())
        return {**losses, "loss_lm": zero, "loss_align": zero}, len(batch["names"])
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"], batch["target_masks"])
    loss_align = out.loss.new_zeros(())
    if anchors is not None and out.prompt_rows:
        wanted = anchors([batch["target_names"][b][k] for b, k in out.prompt_rows])
        loss_align = (out.seg_prompt.float() - wanted.to(out.seg_prompt.device)).pow(2).sum(-1).mean()
    losses = {"loss": out.loss + alignment * loss_align, "loss_lm": out.loss_lm, "loss_dice": out.loss_dice,
              "loss_bce": out.loss_bce, "loss_align": loss_align}
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


def run_plan(config: StageConfig, ranks: Ranks) -> dict:
    """What a checkpoint can only be resumed with: the rank count and how each step's samples split between them."""
    return {"world_size": ranks.world, "micro_batch_size": config.micro_batch_size,
            "gradient_accumulation": config.gradient_accumulation}


def _described(plan: dict) -> str:
    ranks, micro, accumulation = plan["world_size"], plan["micro_batch_size"], plan["gradient_accumulation"]
    return (f"{ranks} rank{'s' if ranks != 1 else ''} (micro-batch {micro} x accumulation {accumulation}: "
            f"{ranks * micro * accumulation} samples per step)")


def check_same_plan(plan: dict, paths: StagePaths) -> None:
    """Refuse to resume on another rank count or batch split. ZeRO partitions the optimizer state per rank, so
    another count cannot load it (DeepSpeed's universal-checkpoint conversion could reshard it, but the sample plan
    would still change: each rank draws the samples of its rank number, and the step count follows the global
    batch). Done before the model is built, so a wrong launch fails in seconds."""
    if not paths.plan.is_file():
        return          # checkpoints written before the plan was recorded
    recorded = json.loads(paths.plan.read_text())
    if recorded == plan:
        return
    tag = (paths.checkpoints / "latest").read_text().strip()
    raise CheckpointError(
        f"stage {paths.stage}'s checkpoint {tag} in {paths.checkpoints} was written by {_described(recorded)}, "
        f"but this run has {_described(plan)}. A checkpoint resumes only on the rank count and batch split it was "
        f"written with (ZeRO partitions the optimizer state per rank; each rank's samples depend on its rank). "
        f"Rerun with {recorded['world_size']} ranks (--nproc {recorded['world_size']}, or the same nodes and GPUs per "
        f"node) and the same micro_batch_size and gradient_accumulation; or restart stage {paths.stage} from its "
        f"beginning by removing {paths.checkpoints}, after keeping its weights as a model folder if wanted "
        f"(`python -m training.export --recipe <recipe> --output {paths.output} --stage {paths.stage} --tag {tag} "
        f"--to <folder>`).")


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak so far: memory allocated on its GPU, or on a CPU run its maximum resident set
    (getrusage reports kB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


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
    validation: list[dict]            # the fixed validation windows (none: the stage is not validated)
    anchors: Stage1Prompts | None = None   # stage 1's prompt per structure, for seg_prompt_alignment


def set_up(stage: int, recipe: Recipe, paths: StagePaths, data_dir: Path, ranks: Ranks) -> StageRun:
    """Model, data and DeepSpeed engine of a stage, resumed from its latest checkpoint when there is one."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    config = recipe.stages[stage]
    plan = run_plan(config, ranks)
    resuming = (paths.checkpoints / "latest").is_file()
    if resuming:
        check_same_plan(plan, paths)
    if config.threads:
        torch.set_num_threads(config.threads)
    model = build_stage_model(stage, recipe, paths.init, torch.bfloat16 if recipe.bf16(stage) else None)
    fingerprint = frozen_fingerprint(model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, stage)
    sources = [open_source(data_dir, name) for name in config.sources]
    check_prepared_data(sources, model)
    validation = validation_set(config, data_dir, sources, model.window_size, ranks)
    per_epoch = samples_per_epoch(config, sources)
    samples_per_step = config.micro_batch_size * config.gradient_accumulation * ranks.world
    steps = total_steps(config, per_epoch, samples_per_step)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=config.adam_betas, eps=config.adam_eps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * steps), steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(recipe, config))
    start = 0
    if resuming:
        check_fingerprint(fingerprint, paths)
        _, client = engine.load_checkpoint(str(paths.checkpoints), load_module_strict=False)
        start = client["step"]
        if ranks.is_main:
            print(f"[stage {stage}] resumed from step {start} of {steps}", flush=True)
    elif ranks.is_main:
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        paths.fingerprint.write_text(json.dumps(fingerprint))
        paths.plan.write_text(json.dumps(plan))
    set_training_mode(engine.module)
    anchors = Stage1Prompts(StagePaths(paths.output, 1).export) if config.seg_prompt_alignment else None
    return StageRun(engine, scheduler, StageSamples(config, sources, model.window_size), steps, start, per_epoch,
                    samples_per_step, validation, anchors)


def validation_set(config: StageConfig, data_dir: Path, training_sources, window, ranks: Ranks) -> list[dict]:
    """The stage's validation windows; built on every rank, so a bad validation source fails every rank alike."""
    if not config.validation_every_steps:
        return []
    if config.stage not in VALIDATED_STAGES:
        if ranks.is_main:
            print(f"[stage {config.stage}] not validated: the stage trains no mask", flush=True)
        return []
    held_out = [open_source(data_dir, name) for name in config.validation_sources]
    check_held_out(held_out, training_sources)
    return validation_samples(config, held_out, window)


def train(run: StageRun, config: StageConfig, paths: StagePaths, ranks: Ranks) -> None:
    stage, module = config.stage, run.engine.module
    dtype = next(module.parameters()).dtype
    collate = Collate(1) if stage == 1 else Collate(stage, module.tokenizer, module.num_visual_tokens, module.token_ids)
    keys = StepBatches(run.start, run.steps, config.gradient_accumulation, ranks.rank, config.micro_batch_size)
    batches = iter(torch.utils.data.DataLoader(run.dataset, batch_sampler=keys, collate_fn=collate,
                                               num_workers=config.num_workers, pin_memory=ranks.device.type == "cuda"))
    logbook = Logbook(paths.root, stage, run.start, run.steps, config.log_every_steps) if ranks.is_main else None
    validate = None
    if run.validation and ranks.is_main:
        validate = Validator(run.validation, lambda samples: to_device(collate(samples), ranks.device, dtype), stage,
                             config.micro_batch_size, ranks.device.type, config.autocast_bf16, paths.validation)
    if ranks.is_main:
        print(f"[stage {stage}] {STAGE_NAMES[stage]}: {run.steps} steps of {config.micro_batch_size} x "
              f"{config.gradient_accumulation} x {ranks.world} samples", flush=True)
    started = time.monotonic()
    for step in range(run.start, run.steps):
        began = time.monotonic()
        # Dropout masks depend on (seed, step, rank) only, so a resumed run repeats the uninterrupted one.
        torch.manual_seed(config.seed * 1_000_003 + step * ranks.world + ranks.rank)
        totals = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=ranks.device)
        for _ in range(config.gradient_accumulation):
            batch = to_device(next(batches), ranks.device, dtype)
            with torch.autocast(ranks.device.type, dtype=torch.bfloat16, enabled=config.autocast_bf16):
                losses, masks = stage_losses(module, batch, stage, run.anchors, config.seg_prompt_alignment)
            if stage >= 3:
                require_same_on_all_ranks(int(masks > 0), ranks.device, "whether the mask decoder runs")
            run.engine.backward(losses["loss"])
            run.engine.step()
            totals += torch.stack([losses[k].detach().double() for k in LOSS_KEYS])
        means = mean_over_ranks(totals / config.gradient_accumulation).tolist()
        seconds = time.monotonic() - began
        done = step + 1
        val_dice = None
        if run.validation and (done % config.validation_every_steps == 0 or done == run.steps):
            if validate is not None:
                val_dice = validate(module, done)
            barrier()
        # Every rank reads the checkpoint request (a shared run folder), and the maximum makes them agree on the step.
        peak, request = max_over_ranks([peak_memory_gib(ranks.device), float(paths.checkpoint_request.exists())],
                                       ranks.device)
        requested = request > 0
        if logbook is not None:
            grad_norm = run.engine.get_global_grad_norm()
            # The ETA extrapolates this process's steps so far, validations and checkpoints included.
            eta = (time.monotonic() - started) / (done - run.start) * (run.steps - done)
            logbook.record({"step": done, "epoch": done * run.samples_per_step / run.per_epoch,
                            "samples": done * run.samples_per_step, **dict(zip(LOSS_KEYS, means)),
                            "val_dice": val_dice, "lr": run.scheduler.get_last_lr()[0],
                            "grad_norm": float(grad_norm) if grad_norm is not None else None,
                            "seconds": seconds, "samples_per_s": run.samples_per_step / seconds, "eta_s": eta,
                            "peak_memory_gib": peak})
        if done % config.save_every_steps == 0 or done == run.steps or requested:
            save(run.engine, paths, done, config.keep_checkpoints, ranks)
        if requested:
            if ranks.is_main:
                paths.checkpoint_request.unlink(missing_ok=True)  # the requester waits for this: the checkpoint is done
                print(f"[stage {stage}] checkpoint step {done} written on request", flush=True)
            barrier()       # no rank reads the request again before it is gone
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
