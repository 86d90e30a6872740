"""The four training stages end to end on the CPU: two gloo ranks started by DeepSpeed's own launcher, the real
DeepSpeed engine (ZeRO-2), crops of the real CTs in ../shared/data/ct, a few steps per stage.

One run of training/run_stages.sh (module fixture) serves the loss, handover, export, skip, validation and
throughput tests; the resume test kills a second run of stage 3 after a checkpoint, checks that one rank refuses
to resume the two ranks' checkpoint, and that resuming on two ranks lands on the same weights.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from r1seg_core.model import R1Seg3D

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
SAVE_EVERY = 2
VALIDATE_EVERY = 4
# The held-out case: the split file keeps it out of the training source and gives it to the validation source.
TRAIN_CASES = ["ts_abdomen_3mm", "ts_dicom_series", "ts_aorta_cta", "ts_heart_cta"]
VALIDATION_CASES = ["ts_upper_abdomen_3mm"]
pytestmark = pytest.mark.slow


def short_recipe(folder: Path, shared_ct: Path) -> Path:
    """The tiny recipe, pointed at the shared CTs, with STEPS steps per stage and a validation every VALIDATE_EVERY."""
    recipe = folder / "recipe"
    for source in (REPO / "training" / "recipes" / "tiny").iterdir():
        (recipe / source.name).parent.mkdir(parents=True, exist_ok=True)
        (recipe / source.name).write_bytes(source.read_bytes())
    data = yaml.safe_load((recipe / "data.yaml").read_text())
    data["sources"][0]["path"] = str(shared_ct / "manifest.json")
    (recipe / "split.json").write_text(json.dumps({"train": TRAIN_CASES, "validation": VALIDATION_CASES}))
    data["sources"].append({**data["sources"][0], "name": "held_out", "split_file": "split.json", "split": "validation"})
    del data["sources"][-1]["cases"]
    (recipe / "data.yaml").write_text(yaml.safe_dump(data))
    for stage in (1, 2, 3, 4):
        path = recipe / f"stage{stage}.yaml"
        config = yaml.safe_load(path.read_text())
        config.update(max_steps=STEPS, save_every_steps=SAVE_EVERY, validation_every_steps=VALIDATE_EVERY,
                      validation_sources=["held_out"], validation_windows=2)
        path.write_text(yaml.safe_dump(config))
    return recipe


def environment() -> dict:
    return {**os.environ, "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def launch(stage: int, recipe: Path, output: Path, data: Path, ranks: int = 2) -> list[str]:
    """DeepSpeed's launcher (what the `deepspeed` command runs) with `ranks` CPU ranks, for one stage."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port()),
            "--module", "training.train", "--stage", str(stage), "--recipe", str(recipe), "--output", str(output),
            "--data", str(data)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_stages(recipe: Path, output: Path, data: Path | None = None) -> subprocess.CompletedProcess:
    command = [str(REPO / "training" / "run_stages.sh"), "--nproc", "2", "--config", str(recipe), "--output", str(output)]
    if data is not None:
        command += ["--data", str(data)]
    return subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_ct):
    root = tmp_path_factory.mktemp("training")
    recipe = short_recipe(root, shared_ct)
    # A checkpoint request (what slurm/two_nodes.sbatch makes on the pre-timeout signal) waiting before the run.
    (root / "run").mkdir()
    (root / "run" / "CHECKPOINT_NOW").touch()
    result = run_stages(recipe, root / "run")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root / "run", recipe


def test_a_checkpoint_request_is_answered_after_the_current_step(trained):
    run, _ = trained
    # Stage 1's first step is not a multiple of SAVE_EVERY: only the request makes this checkpoint.
    assert 1 % SAVE_EVERY != 0
    assert "[stage 1] checkpoint step 1 written on request" in (run / "stage1" / "train.log").read_text()
    assert not (run / "CHECKPOINT_NOW").exists()
    assert all("on request" not in (run / f"stage{n}" / "train.log").read_text() for n in (2, 3, 4))


def metrics(run: Path, stage: int) -> list[dict]:
    with (run / f"stage{stage}" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def losses(run: Path, stage: int) -> list[float]:
    return [float(row["loss"]) for row in metrics(run, stage)]


def weights(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_each_stage_lowers_its_loss_and_logs_it(trained, stage):
    run, _ = trained
    curve = losses(run, stage)
    assert len(curve) == STEPS
    assert np.mean(curve[-3:]) < np.mean(curve[:3]), curve
    assert list((run / f"stage{stage}" / "tensorboard").glob("events.out.tfevents.*"))


def test_stages_hand_over_through_their_exports(trained):
    run, _ = trained
    sam, stage2, stage3, final = (weights(run / p) for p in ("stage1/model", "stage2/model", "stage3/model", "final"))
    assert not any(k.startswith("language_model.") for k in sam)       # stage 1 is the SAM mode
    assert any(k.startswith("text_encoder.") for k in sam) and not any(k.startswith("text_encoder.") for k in final)
    encoder = [k for k in sam if k.startswith("image_encoder.")]
    decoder = [k for k in sam if k.startswith("mask_decoder.")]
    # The encoder trains in stage 1 only; the decoder in stages 1 and 4.
    assert all(np.array_equal(sam[k], final[k]) for k in encoder)
    assert all(np.array_equal(sam[k], stage3[k]) for k in decoder)
    assert not all(np.array_equal(sam[k], final[k]) for k in decoder)
    # Stage 3 trained the LLM through LoRA; its export holds the merged weights, no adapter.
    assert not any("lora_" in k for k in stage3)
    assert any(not np.array_equal(stage2[k], stage3[k]) for k in stage2 if ".self_attn." in k)


def test_final_folder_loads_and_answers(trained, shared_ct):
    from r1seg_core.inference import Predictor

    run, _ = trained
    model = R1Seg3D.from_pretrained(run / "final")
    assert model.window_size == (32, 128, 128) and model.config.preprocess["spacing_zyx"] == [2.0, 1.0, 1.0]
    assert model.language_model is not None and not model.language_model.has_lora
    result = Predictor(run / "final", device="cpu").ask(shared_ct / "totalseg_pulmonary_report" / "ct_cropped.nii.gz",
                                                        "segment the heart")
    assert result.answer and [t.name for t in result.targets] == ["heart"]


def test_rerun_skips_finished_stages(trained):
    run, recipe = trained
    result = run_stages(recipe, run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(f"stage {n} already finished" in result.stdout for n in (1, 2, 3, 4))


def test_resume_after_kill_matches_the_uninterrupted_run(trained, tmp_path):
    run, recipe = trained
    output = tmp_path / "resumed"
    for stage in (1, 2):           # stage 3 starts from stage 2's export; its [SEG] alignment reads stage 1's
        (output / f"stage{stage}").mkdir(parents=True)
        os.symlink(run / f"stage{stage}" / "model", output / f"stage{stage}" / "model")
    command = launch(3, recipe, output, run / "data")
    latest = output / "stage3" / "checkpoints" / "latest"
    first = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not latest.is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)       # the launcher and both ranks, mid-run
        first.wait()
    killed_at = int(latest.read_text().strip().removeprefix("step"))
    assert killed_at < STEPS and not (output / "stage3" / "model").exists()
    # One rank cannot take over two ranks' checkpoint (ZeRO-2 shards, per-rank samples): refused, naming both counts.
    refused = subprocess.run(launch(3, recipe, output, run / "data", ranks=1), cwd=REPO, env=environment(),
                             capture_output=True, text=True, timeout=300)
    message = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "written by 2 ranks (micro-batch 2 x accumulation 1: 4 samples per step)" in message, message[-3000:]
    assert "this run has 1 rank (micro-batch 2 x accumulation 1: 2 samples per step)" in message
    assert "Rerun with 2 ranks (--nproc 2" in message
    assert latest.read_text().strip() == f"step{killed_at:07d}"
    second = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from step {killed_at} of {STEPS}" in second.stdout
    resumed, uninterrupted = weights(output / "stage3" / "model"), weights(run / "stage3" / "model")
    assert resumed.keys() == uninterrupted.keys()
    # atol 1e-5: on a loaded 2-core machine one value in 65,792 once differed by 1.8e-6 (the CPU's reduction order);
    # a step lost or repeated on resume moves Adam's weights by about the learning rate, 1e-3.
    for key in resumed:
        np.testing.assert_allclose(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-5, err_msg=key)
    curve = losses(output, 3)
    assert len(curve) == STEPS and np.allclose(curve, losses(run, 3), rtol=1e-5)
    # The validation windows are fixed, so the resumed run's final validation scores the same.
    assert float(metrics(output, 3)[-1]["val_dice"]) == pytest.approx(float(metrics(run, 3)[-1]["val_dice"]), abs=1e-4)


def test_zero2_matches_plain_data_parallel_when_only_some_samples_have_masks(trained, tmp_path):
    """ZeRO-2 fills its gradient buckets in arrival order, so ranks must run the same backward graph; the samples'
    shared positive/negative plan ensures it (training/data/samples.py). Stage 4 (decoder trained, negatives in
    the mix) under ZeRO stage 0, which all-reduces every gradient in parameter order, must land on the same weights."""
    run, recipe = trained
    plain = tmp_path / "recipe"
    shutil.copytree(recipe, plain)
    settings = json.loads((plain / "ds_config.json").read_text())
    settings["zero_optimization"] = {"stage": 0}
    (plain / "ds_config.json").write_text(json.dumps(settings))
    output = tmp_path / "zero0"
    (output / "stage3").mkdir(parents=True)
    os.symlink(run / "stage3" / "model", output / "stage3" / "model")
    command = launch(4, plain, output, run / "data")
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    zero0, zero2, start = weights(output / "final"), weights(run / "final"), weights(run / "stage3" / "model")
    assert max(np.abs(zero2[k] - start[k]).max() for k in zero2) > 1e-3          # training moved the weights ...
    for key in zero2:
        np.testing.assert_allclose(zero0[key], zero2[key], rtol=1e-4, atol=1e-5, err_msg=key)   # ... the same way


def test_a_failing_stage_stops_the_run_with_a_clear_message(trained, tmp_path):
    run, recipe = trained
    broken = tmp_path / "recipe"
    shutil.copytree(recipe, broken)
    stage1 = yaml.safe_load((broken / "stage1.yaml").read_text())
    (broken / "stage1.yaml").write_text(yaml.safe_dump({**stage1, "init_from": str(tmp_path / "no-such-model")}))
    result = run_stages(broken, tmp_path / "run", data=run / "data")
    assert result.returncode == 1
    assert "stage 1 FAILED" in result.stderr and "no-such-model" in (tmp_path / "run" / "stage1" / "train.log").read_text()
    assert not (tmp_path / "run" / "stage2").exists()


def test_validation_dice_is_logged_beside_the_loss_and_matches_a_recomputation(trained):
    import torch
    from monai.metrics import DiceMetric

    run, _ = trained
    for stage in (1, 3, 4):
        validated = [(int(row["step"]), float(row["val_dice"])) for row in metrics(run, stage) if row["val_dice"]]
        assert [step for step, _ in validated] == [VALIDATE_EVERY, STEPS]
        assert all(0.0 <= dice <= 1.0 for _, dice in validated)
    assert not any(row["val_dice"] for row in metrics(run, 2))          # stage 2 trains no mask
    saved = np.load(run / "stage1" / "validation.npz")
    assert int(saved["step"]) == STEPS and list(saved["cases"]) == ["held_out/ts_upper_abdomen_3mm"] * 2
    predictions, labels = saved["predictions"], saved["labels"]
    assert labels.shape == (2, 32, 128, 128) and labels.any(axis=(1, 2, 3)).all()
    # MONAI's Dice of the kept masks is the logged one ...
    monai_dice = DiceMetric(include_background=True, reduction="mean")(
        torch.from_numpy(predictions[:, None]).float(), torch.from_numpy(labels[:, None]).float())
    assert float(metrics(run, 1)[-1]["val_dice"]) == pytest.approx(float(monai_dice.mean()), abs=1e-6)
    # ... and the kept masks are what the exported stage-1 model (the final step's weights) answers on the windows.
    model = R1Seg3D.from_pretrained(run / "stage1" / "model").eval()
    with torch.no_grad():
        segmentation, _ = model.segment_with_text(torch.from_numpy(saved["images"].astype(np.float32))[:, None],
                                                  [str(name) for name in saved["names"]])
    again = (torch.sigmoid(segmentation.logits[:, 0]) >= 0.5).numpy()
    assert (again == predictions).mean() > 0.9999


def test_throughput_eta_and_peak_memory_are_logged(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = trained
    samples_per_step = 2 * 1 * 2                    # micro-batch x accumulation x ranks
    for stage in (1, 2, 3, 4):
        rows = metrics(run, stage)
        seconds = np.array([float(r["seconds"]) for r in rows])
        rate = np.array([float(r["samples_per_s"]) for r in rows])
        eta = np.array([float(r["eta_s"]) for r in rows])
        peak = np.array([float(r["peak_memory_gib"]) for r in rows])
        assert (seconds > 0).all() and (rate > 0).all()
        np.testing.assert_allclose(rate * seconds, samples_per_step, rtol=1e-6)
        assert eta[-1] == 0 and eta[0] > eta[-2] > 0                    # counts down to 0 at the last step
        # A running maximum of a CPU process's resident set: a few hundred MB for the tiny model, never falling.
        assert 0.1 < peak[0] and peak[-1] < 8 and (np.diff(peak) >= 0).all()
        events = EventAccumulator(str(run / f"stage{stage}" / "tensorboard"))
        events.Reload()
        logged = set(events.Tags()["scalars"])
        assert {f"stage{stage}/{key}" for key in ("samples_per_s", "eta_s", "peak_memory_gib")} <= logged
    events = EventAccumulator(str(run / "stage1" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("stage1/val_dice")] == [VALIDATE_EVERY, STEPS]


def test_stage_3_pulls_seg_prompts_towards_stage_1s_prompts(trained):
    run, _ = trained
    aligned = [float(row["loss_align"]) for row in metrics(run, 3) if float(row["loss_dice"]) > 0]
    assert aligned and all(value > 0 for value in aligned)
    assert not any(float(row["loss_align"]) for row in metrics(run, 2))        # off in stage 2
    assert not any(float(row["loss_align"]) for row in metrics(run, 4))        # and in tiny's stage 4


def test_calibration_picks_the_presence_volume_with_fewest_errors():
    from training.calibrate import best_threshold

    def rows(pairs):
        return [{"marked_ml": marked, "present": present} for marked, present in pairs]

    # Separable: absent organs marked 0 and 2 mL, present ones 50 and 80 mL -> between 2 and 50 (geometric mean 10).
    threshold, errors = best_threshold(rows([(0.0, False), (2.0, False), (50.0, True), (80.0, True)]))
    assert errors == 0 and threshold == pytest.approx(10.0)
    # One absent organ marked 60 mL: no volume separates them. 25 mL (halfway from 0 to 50) calls it present, 69 mL
    # (geometric mean of 60 and 80) misses the 50 mL organ; one error each, and the lower volume is kept.
    threshold, errors = best_threshold(rows([(0.0, False), (60.0, False), (50.0, True), (80.0, True)]))
    assert errors == 1 and threshold == pytest.approx(25.0)


def test_calibration_chooses_one_volume_or_one_per_structure_by_slabs_left_out():
    """The form is chosen on the training slabs alone: per structure only where it misclassifies fewer slabs that
    were left out of its fit; a tie keeps one volume. Volumes by hand (geometric means of the gap's two ends)."""
    import math

    from training.calibrate import fit_presence

    def rows(structure, pairs):
        return [{"structure": structure, "marked_ml": marked, "present": present} for marked, present in pairs]

    # The aorta's present slabs (1, 2 mL) lie below the liver's absent one (10 mL): no one volume separates them.
    apart = rows("liver", [(0.0, False), (10.0, False), (50.0, True), (80.0, True)]) + rows(
        "aorta", [(0.1, False), (0.2, False), (1.0, True), (2.0, True)])
    fitted = fit_presence(apart)
    assert fitted["leave_one_out_errors"]["per structure"] == 0 < fitted["leave_one_out_errors"]["one volume"]
    assert fitted["form"] == "per structure" and fitted["misclassified"] == 0
    assert fitted["presence_min_ml"] == {"liver": round(math.sqrt(10 * 50), 2), "aorta": round(math.sqrt(0.2 * 1), 2)}
    # Both forms make no error on a slab left out: one volume, halfway from 0 to 40 mL.
    alike = rows("liver", [(0.0, False), (50.0, True)]) + rows("spleen", [(0.0, False), (40.0, True)])
    fitted = fit_presence(alike)
    assert fitted["leave_one_out_errors"] == {"one volume": 0, "per structure": 0}
    assert fitted["form"] == "one volume" and fitted["presence_min_ml"] == pytest.approx(20.0)
