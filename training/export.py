"""Gather a stage's ZeRO checkpoint into a model folder in r1seg_core's inference format (LoRA merged).

    python -m training.export --recipe training/recipes/tiny --output runs/tiny --stage 4 [--tag step0000012] [--to DIR]

Training runs this at the end of each stage (rank 0). It also works offline on any saved checkpoint, without
DeepSpeed's launcher and without a GPU: DeepSpeed's zero_to_fp32 reassembles the fp32 weights from the
optimizer partitions of all ranks, the frozen weights come from the same rebuild the stage started from, the
LoRA adapter is folded into the LLM, and `R1Seg3D.save_pretrained` writes the folder.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from r1seg_core.errors import CheckpointError
from r1seg_core.model.checkpoint import save_model

from .recipe import Recipe, load_recipe
from .run_layout import StagePaths
from .stage_model import STAGE_NAMES, build_stage_model, frozen_fingerprint


def latest_tag(checkpoints: Path) -> str:
    latest = checkpoints / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{checkpoints} holds no finished checkpoint (no 'latest' file)")
    return latest.read_text().strip()


def check_fingerprint(rebuilt: list[float], paths: StagePaths) -> None:
    """The rebuilt frozen weights must be those the stage trained with (the checkpoints leave them out)."""
    if not paths.fingerprint.is_file():
        return
    recorded = json.loads(paths.fingerprint.read_text())
    if not all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(recorded, rebuilt)):
        raise CheckpointError(f"the frozen weights rebuilt from {paths.init or 'the recipe'} differ from those stage "
                              f"{paths.stage} trained with ({recorded} vs {rebuilt}); was the previous stage's folder "
                              "or the base model changed?")


def trained_state(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    """The trained weights of a checkpoint: reassembled from the ZeRO partitions, or, without ZeRO (stage 0),
    the module's own state as the engine saved it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any((checkpoints / tag).glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag, exclude_frozen_parameters=True)
    # The engine's own file (DeepSpeed metadata objects besides tensors), written by this run: trusted.
    saved = torch.load(checkpoints / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}


def load_trained_weights(model, checkpoints: Path, tag: str) -> None:
    state = trained_state(checkpoints, tag)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(trained - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {checkpoints / tag} does not match stage model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)


def final_delta_rank(recipe: Recipe) -> int | None:
    """A final model whose LLM base ships in a package is stored as that base plus what training changed: stages 3
    and 4 each merged a LoRA of rank r into it, so the change has rank at most 2r. None: store the whole LLM."""
    llm = recipe.model_config().language_model
    return 2 * llm.lora.r if llm is not None and llm.package else None


def export_stage(recipe: Recipe, paths: StagePaths, tag: str | None = None, destination: Path | None = None) -> Path:
    stage = paths.stage
    tag = tag or latest_tag(paths.checkpoints)
    destination = Path(destination or paths.export)
    model = build_stage_model(stage, recipe, paths.init)
    check_fingerprint(frozen_fingerprint(model), paths)
    load_trained_weights(model, paths.checkpoints, tag)
    if model.language_model is not None:
        model.language_model.merge_lora()
        # The stage's model may come from a merged export; the base it was trained from is still the recipe's.
        model.config.language_model.package = recipe.model_config().language_model.package
    sources = ", ".join(recipe.stages[stage].sources)
    model.config.card = {**model.config.card, "untrained": False,
                         "trained_on": f"{sources} with {recipe.folder.name} recipe, stages 1-{stage} "
                                       f"(last: {STAGE_NAMES[stage]}, checkpoint {tag})"}
    # Written beside the destination and renamed into place, so a folder that exists is complete.
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.to(torch.bfloat16 if recipe.bf16(stage) else torch.float32)
    save_model(model, partial, llm_delta_rank=final_delta_rank(recipe) if stage == 4 else None)
    shutil.rmtree(destination, ignore_errors=True)
    partial.rename(destination)
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path, help="the run folder (as given to run_stages.sh)")
    parser.add_argument("--stage", required=True, type=int, choices=(1, 2, 3, 4))
    parser.add_argument("--tag", help="checkpoint tag (default: the latest)")
    parser.add_argument("--to", type=Path, help="destination folder (default: the stage's export folder)")
    args = parser.parse_args(argv)
    folder = export_stage(load_recipe(args.recipe), StagePaths(args.output.resolve(), args.stage), args.tag, args.to)
    print(f"[export] stage {args.stage} -> {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
