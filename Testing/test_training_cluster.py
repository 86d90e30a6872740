"""Cluster training: variables reaching the ranks of other nodes, recipe variables, the SLURM scripts, MSD label
names, the bounded foreground cache, stage 1's absent targets, and the validation sources' held-out rule.

Nothing here trains: the launcher test starts a module that prints its environment, and the SLURM dry run puts
recording stand-ins for srun and scontrol (which this machine does not have) on PATH.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from r1seg_core.errors import InvalidInputError
from r1seg_core.model.r1seg3d import bce_loss, dice_loss
from r1seg_core.preprocess import PreprocessConfig
from training.data.cases import SourceSpec
from training.data.prepare import prepare_source
from training.data.prepared import FOREGROUND_CACHE_CASES, INDEX_NAME, PreparedCase, _foreground, open_source, write_case
from training.data.samples import SampleKey, StageSamples
from training.distributed import collective_timeout, rank_environment
from training.recipe import load_recipe
from training.validation import check_held_out

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"

# ---- R1SEG_* variables on every node ------------------------------------------------------------------------

# Each rank writes its own file (HOME is the test's folder on the "remote" side): two ranks printing at once can
# interleave their lines on the launcher's stdout.
PROBE = '''import json, os
with open(os.path.join(os.environ["HOME"], "probe-%s.json" % os.environ["RANK"]), "w") as probe:
    json.dump({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "R1SEG_MODELS", "NOT_FORWARDED")}, probe)
'''


@pytest.mark.skipif(shutil.which("pdsh") is None, reason="DeepSpeed's multi-node runner needs pdsh (apt install pdsh)")
def test_ranks_started_by_the_multi_node_runner_read_r1seg_variables_from_deepspeed_env(tmp_path):
    """launch.sh -> DeepSpeed's multi-node (pdsh) runner -> deepspeed.launcher.launch -> 2 ranks.

    Everything is real except the hop to the other node: pdsh's exec module runs the remote command under
    `env -i ... bash -c`, which is what sshd does (a fresh environment, the command line evaluated by a shell),
    without needing an ssh server. The ranks therefore see only what the runner forwards: NOT_FORWARDED, set
    in the launcher's environment, must not arrive, and R1SEG_MODELS must, through RUN_DIR/.deepspeed_env.
    """
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "r1seg_probe.py").write_text(PROBE)
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    remote_shell = f"-R exec env -i PATH=/usr/bin:/bin HOME={tmp_path} bash -c 'eval \"$*\"' remote-shell"
    env = {**os.environ, "PYTHON": sys.executable, "R1SEG_MODELS": str(tmp_path / "models"), "NOT_FORWARDED": "1",
           "PYTHONPATH": str(tmp_path / "probe"), "HOME": str(tmp_path)}   # no ~/.deepspeed_env of this machine
    run = subprocess.run(
        [TRAINING / "launch.sh", tmp_path / "run", "--hostfile", tmp_path / "hostfile", "--force_multi",
         "--no_ssh_check", "--master_addr", "127.0.0.1", "--launcher_args", remote_shell, "--module", "r1seg_probe"],
        env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("probe-*.json"))]
    assert sorted(r["RANK"] for r in ranks) == ["0", "1"]
    assert all(r["WORLD_SIZE"] == "2" and r["MASTER_ADDR"] == "127.0.0.1" for r in ranks)
    assert all(r["R1SEG_MODELS"] == str(tmp_path / "models") and r["NOT_FORWARDED"] is None for r in ranks)
    assert (tmp_path / "run" / ".deepspeed_env").read_text() == f"R1SEG_MODELS={tmp_path / 'models'}\n"


def test_a_value_the_runner_cannot_forward_is_refused(tmp_path):
    run = subprocess.run([TRAINING / "launch.sh", tmp_path, "--help"], capture_output=True, text=True,
                         env={**os.environ, "R1SEG_DATA": "/data/$USER"})
    assert run.returncode == 2 and "R1SEG_DATA" in run.stderr


def test_an_unset_variable_in_a_recipe_path_names_the_file_the_key_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("R1SEG_MODELS", raising=False)
    monkeypatch.setenv("R1SEG_DATA", str(tmp_path / "data"))
    with pytest.raises(InvalidInputError, match=r"model\.yaml: overrides\.language_model\.path .*\$\{R1SEG_MODELS\}"):
        load_recipe(TRAINING / "recipes" / "paper-phi3")
    monkeypatch.delenv("R1SEG_DATA")
    with pytest.raises(InvalidInputError, match=r"data\.yaml, source 'x': path .*\$R1SEG_DATA\b"):
        SourceSpec.from_dict({"name": "x", "layout": "msd", "path": "$R1SEG_DATA/0018"}, tmp_path)


# ---- SLURM ----------------------------------------------------------------------------------------------------

SCRIPTS = ["slurm/two_nodes.sbatch", "slurm/prepare.sbatch", "run_stages.sh", "launch.sh"]

# Stand-ins for what only a SLURM cluster has. srun records its command line and the job's environment, then
# (as a job step would) runs until it ends, answering a checkpoint request as the ranks do (training/train.py:
# checkpoint, then delete the request); scontrol answers `show hostnames` and records `requeue`.
STUB_SRUN = '''#!/bin/bash
echo $$ > "$RECORD/srun.pid"
python3 -c 'import json, os, sys; print(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}))' "$@" \\
    >> "$RECORD/srun.jsonl"
end=$((SECONDS + ${SRUN_SECONDS:-0}))
while [ "$SECONDS" -lt "$end" ]; do
    if [ -e "$OUTPUT/CHECKPOINT_NOW" ]; then
        sleep 1                                   # the step in progress, then the checkpoint
        echo checkpoint >> "$RECORD/events.log"
        rm "$OUTPUT/CHECKPOINT_NOW"
    fi
    sleep 0.1
done
'''
STUB_SCONTROL = '''#!/bin/bash
case "$1 $2" in
    "show hostnames") echo gpu-a01; echo gpu-a02 ;;
    requeue*) echo "$*" >> "$RECORD/scontrol.log"; echo requeue >> "$RECORD/events.log" ;;
    *) echo "unexpected scontrol $*" >&2; exit 1 ;;
esac
'''


def test_scripts_parse():
    for script in SCRIPTS:
        run = subprocess.run(["bash", "-n", TRAINING / script], capture_output=True, text=True)
        assert run.returncode == 0, f"{script}: {run.stderr}"


def start_batch_job(tmp_path: Path, srun_seconds: int) -> subprocess.Popen:
    """two_nodes.sbatch as SLURM would run it on the first node: 2 nodes x 8 tasks, submitted from the repo."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(tmp_path), "SRUN_SECONDS": str(srun_seconds),
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "123457", "SLURM_JOB_NODELIST": "gpu-a[01-02]",
           "SLURM_NNODES": "2", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "8",
           "OUTPUT": str(tmp_path / "run"), "R1SEG_MODELS": "/models", "R1SEG_DATA": "/data"}
    return subprocess.Popen(["bash", TRAINING / "slurm" / "two_nodes.sbatch"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_nodes_sbatch_starts_one_rank_per_gpu_with_the_rendezvous_on_the_first_node(tmp_path):
    job = start_batch_job(tmp_path, srun_seconds=0)
    output, _ = job.communicate(timeout=60)
    # The stand-in trains nothing, so stage 1 leaves no export and the run stops there, as a failed stage would.
    assert job.returncode == 1 and "stage 1 FAILED" in output, output
    (step,) = [json.loads(line) for line in (tmp_path / "srun.jsonl").read_text().splitlines()]
    argv, env = step["argv"], step["env"]
    assert argv[:4] == ["--kill-on-bad-exit=1", "--label", "--cpus-per-task=8", os.environ.get("PYTHON", "python3")]
    assert argv[4:] == ["-u", "-m", "training.train", "--stage", "1", "--recipe",
                        str(TRAINING / "recipes" / "paper-llama3"), "--output", str(tmp_path / "run"),
                        "--data", str(tmp_path / "run" / "data")]
    assert env["MASTER_ADDR"] == "gpu-a01" and env["MASTER_PORT"] == str(20000 + 123457 % 20000)
    assert env["R1SEG_MODELS"] == "/models" and env["R1SEG_DATA"] == "/data"
    assert not any((tmp_path / "run" / "data").iterdir())     # prepared by prepare.sbatch, not in the GPU job
    # What each of srun's 16 tasks then computes (training/distributed.py): 16 ranks, 8 per node, one world.
    tasks = [rank_environment({**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i % 8)}) for i in range(16)]
    assert sorted(int(t["RANK"]) for t in tasks) == list(range(16))
    assert [t["LOCAL_RANK"] for t in tasks] == [str(i % 8) for i in range(16)]
    assert {t["WORLD_SIZE"] for t in tasks} == {"16"}
    # A launcher's own values win; srun without a rendezvous is refused.
    assert rank_environment({**env, "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "RANK": "3"}) == {}
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        rank_environment({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16"})


def test_the_pre_timeout_signal_requeues_the_job(tmp_path):
    job = start_batch_job(tmp_path, srun_seconds=60)
    pid_file = tmp_path / "srun.pid"
    deadline = time.monotonic() + 60                  # generous: the machine may be busy
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not pid_file.is_file():
        job.kill()
        pytest.fail(f"the job step never started: {job.communicate()[0]}")
    time.sleep(0.2)                                   # the stand-in writes its pid before its record
    job.send_signal(signal.SIGUSR1)                   # --signal=B:USR1@300 signals the batch shell only
    log = tmp_path / "scontrol.log"
    while not log.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(int(pid_file.read_text()), signal.SIGTERM)     # SLURM ends the job's steps when it requeues it
    output, _ = job.communicate(timeout=30)
    assert log.read_text() == "requeue 123457\n", output
    assert "requeueing job 123457" in output
    # The checkpoint came first: the requeued job loses no step.
    assert (tmp_path / "events.log").read_text() == "checkpoint\nrequeue\n", output
    assert not (tmp_path / "run" / "CHECKPOINT_NOW").exists()


def test_collective_timeout_comes_from_the_environment():
    assert collective_timeout({}).total_seconds() == 600
    assert collective_timeout({"R1SEG_COLLECTIVE_TIMEOUT_S": "90"}).total_seconds() == 90
    with pytest.raises(ValueError, match="R1SEG_COLLECTIVE_TIMEOUT_S"):
        collective_timeout({"R1SEG_COLLECTIVE_TIMEOUT_S": "ten minutes"})


# ---- MSD label names ------------------------------------------------------------------------------------------

# The label lists of the published dataset.json files (Medical Segmentation Decathlon, Task03-Task10).
MSD_TASKS = {
    "0018": ("Task10_Colon", {"0": "background", "1": "colon cancer primaries"}, ["colon tumor"]),
    "0019": ("Task08_HepaticVessel", {"0": "background", "1": "Vessel", "2": "Tumour"}, ["hepatic vessel", "liver tumor"]),
    "0020": ("Task03_Liver", {"0": "background", "1": "liver", "2": "cancer"}, ["liver", "liver tumor"]),
    "0021": ("Task06_Lung", {"0": "background", "1": "cancer"}, ["lung tumor"]),
    "0022": ("Task07_Pancreas", {"0": "background", "1": "pancreas", "2": "cancer"}, ["pancreas", "pancreas tumor"]),
    "0023": ("Task09_Spleen", {"0": "background", "1": "spleen"}, ["spleen"]),
}


def write_msd_task(folder: Path, labels: dict) -> None:
    """One small CT (40 x 48 x 48 voxels of 2 x 1 x 1 mm) whose labels 1, 2... are blocks, and the dataset.json."""
    ct = np.full((40, 48, 48), -1000, np.int16)          # air around a soft-tissue body
    ct[:, 4:44, 4:44] = 40
    label = np.zeros(ct.shape, np.uint8)
    for value in range(1, len(labels)):
        label[8:20, 8 + 16 * (value - 1):20 + 16 * (value - 1), 10:30] = value
    for array, path in ((ct, folder / "imagesTr" / "case_001.nii.gz"), (label, folder / "labelsTr" / "case_001.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 2.0))
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "name": folder.name, "modality": {"0": "CT"}, "labels": labels, "numTraining": 1,
        "training": [{"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"}]}))


def test_msd_tasks_with_their_published_label_names_prepare(tmp_path):
    for code, (task, labels, expected) in MSD_TASKS.items():
        write_msd_task(tmp_path / code, labels)
        index = prepare_source(SourceSpec.from_dict({"name": code, "layout": "msd", "path": code}, tmp_path),
                               PreprocessConfig(), tmp_path / "data")
        assert index["cases"] == ["case_001"] and not index["problems"], (task, index["problems"])
        meta = json.loads((tmp_path / "data" / code / "case_001" / "case.json").read_text())
        assert [s["name"] for s in meta["structures"]] == expected, task
    # The folder as downloaded, named by `dataset:`; without it "cancer" has no meaning and is refused.
    write_msd_task(tmp_path / "Task06_Lung", MSD_TASKS["0021"][1])
    named = SourceSpec.from_dict({"name": "lung", "layout": "msd", "path": "Task06_Lung", "dataset": "0021"}, tmp_path)
    assert prepare_source(named, PreprocessConfig(), tmp_path / "data")["cases"] == ["case_001"]
    anonymous = SourceSpec.from_dict({"name": "lung", "layout": "msd", "path": "Task06_Lung"}, tmp_path)
    (problem,) = prepare_source(anonymous, PreprocessConfig(), tmp_path / "data", reuse=False)["problems"]
    assert "'cancer'" in problem and "published_names" in problem


# ---- the foreground cache -------------------------------------------------------------------------------------


def test_the_foreground_cache_keeps_a_bounded_number_of_cases(tmp_path):
    _foreground.cache_clear()
    cases = []
    for i in range(FOREGROUND_CACHE_CASES + 6):
        voxels = np.array([[i, 0, 0]], np.int32)
        write_case(tmp_path / f"c{i}", np.zeros((2, 2, 2)), np.ones((1, 2, 2, 2), np.uint8), {1: voxels}, {"case_id": f"c{i}"})
        cases.append(PreparedCase("src", tmp_path / f"c{i}", {"case_id": f"c{i}"}))
    for case in cases:
        case.foreground_voxels(1)
    assert _foreground.cache_info().currsize == FOREGROUND_CACHE_CASES
    assert cases[0].foreground_voxels(1).tolist() == [[0, 0, 0]]    # dropped first, read again
    assert _foreground.cache_info().currsize == FOREGROUND_CACHE_CASES


# ---- stage 1 on absent targets --------------------------------------------------------------------------------


def test_stage_one_asks_for_absent_targets_at_the_configured_rate(tmp_path):
    # One case with the liver (a block) and the spleen annotated but absent; window 8 x 16 x 16.
    layers = np.zeros((1, 16, 32, 32), np.uint8)
    layers[0, 4:12, 8:24, 8:24] = 1
    foreground = {1: np.argwhere(layers[0] == 1).astype(np.int32)}
    meta = {"case_id": "c0", "shape_zyx": [16, 32, 32], "structures": [{"index": 1, "name": "liver", "voxels": 2048}],
            "absent": ["spleen"]}
    write_case(tmp_path / "src" / "c0", np.full((16, 32, 32), 0.5), layers, foreground, meta)
    (tmp_path / "src" / INDEX_NAME).write_text(json.dumps({"cases": ["c0"], "preprocess": {}}))
    config = load_recipe(TRAINING / "recipes" / "tiny").stages[1]
    config.sources, config.questions.negative_ratio = {"src": 1.0}, 0.25
    samples = StageSamples(config, [open_source(tmp_path, "src")], (8, 16, 16))
    items = [samples[SampleKey(step, 0, 0, slot)] for step in range(100) for slot in range(2)]
    absent = [item for item in items if item["names"] == ["spleen"]]
    assert 0.18 <= len(absent) / len(items) <= 0.32
    assert all(item["masks"].shape == (1, 8, 16, 16) and item["masks"].sum() == 0 for item in absent)
    assert all(item["masks"].sum() > 0 for item in items if item["names"] == ["liver"])
    config.questions.negative_ratio = 0.0             # the recipes' default: positives only, as before
    assert all(samples[SampleKey(step, 0, 0, 0)]["names"] == ["liver"] for step in range(20))


def test_dice_and_bce_of_an_empty_target_match_the_hand_computation():
    logits = torch.full((2, 4, 5, 5), -2.0)           # two masks of 100 voxels, both predicted at sigmoid(-2)
    empty = torch.zeros_like(logits)
    p = 1 / (1 + math.exp(2.0))
    # dice = 1 - (2 * 0 + 1) / (100 p + 0 + 1); bce = -log(1 - p) per voxel
    assert dice_loss(logits, empty).item() == pytest.approx(1 - 1 / (100 * p + 1), rel=1e-6)
    assert bce_loss(logits, empty).item() == pytest.approx(-math.log(1 - p), rel=1e-6)
    # One empty and one full target in a batch: dice is averaged per mask.
    full = empty.clone()
    full[1] = 1.0
    expected = ((1 - 1 / (100 * p + 1)) + (1 - (2 * 100 * p + 1) / (100 * p + 100 + 1))) / 2
    assert dice_loss(logits, full).item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(dice_loss(torch.full((1, 10), -50.0), torch.zeros(1, 10)))


# ---- validation during training: held-out sources --------------------------------------------------------------


def recipe_with(tmp_path: Path, stage1: dict) -> Path:
    recipe = tmp_path / "recipe"
    shutil.copytree(TRAINING / "recipes" / "tiny", recipe)
    settings = yaml.safe_load((recipe / "stage1.yaml").read_text())
    (recipe / "stage1.yaml").write_text(yaml.safe_dump({**settings, **stage1}))
    return recipe


def test_a_validation_without_held_out_sources_is_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="validation_every_steps needs validation_sources"):
        load_recipe(recipe_with(tmp_path / "a", {"validation_every_steps": 10}))
    with pytest.raises(InvalidInputError, match=r"stage1\.yaml: sources \['nowhere'\] are not in data\.yaml"):
        load_recipe(recipe_with(tmp_path / "b", {"validation_every_steps": 10, "validation_sources": ["nowhere"]}))
    # Rank 0 validates alone, which ZeRO-3's sharded parameters do not allow.
    zero3 = {"validation_every_steps": 10, "validation_sources": ["shared_ct"],
             "deepspeed": {"zero_optimization": {"stage": 3}}}
    with pytest.raises(InvalidInputError, match=r"stage1\.yaml: validation_every_steps needs ZeRO stage 0-2"):
        load_recipe(recipe_with(tmp_path / "c", zero3))
    load_recipe(recipe_with(tmp_path / "d", {**zero3, "deepspeed": {"zero_optimization": {"stage": 2}}}))


def test_a_validation_case_that_training_also_reads_is_refused(tmp_path):
    def source(name: str, cases: list[str], path: str):
        for case in cases:
            write_case(tmp_path / name / case, np.zeros((2, 2, 2)), np.ones((1, 2, 2, 2), np.uint8),
                       {1: np.zeros((1, 3), np.int32)}, {"case_id": case})
        (tmp_path / name / INDEX_NAME).write_text(json.dumps(
            {"cases": cases, "preprocess": {}, "prepared_with": {"source": {"path": path}}}))
        return open_source(tmp_path, name)

    train = source("train", ["s1", "s2"], "/data/0011")
    check_held_out([source("val", ["s3"], "/data/0011")], [train])           # held out: fine
    check_held_out([source("other", ["s1"], "/data/0020")], [train])         # same id, another dataset: fine
    with pytest.raises(InvalidInputError, match=r"'leaky' shares cases \['s2'\] with training source 'train'"):
        check_held_out([source("leaky", ["s2", "s4"], "/data/0011")], [train])
