"""How many Ray Train workers a run gets, and where local mode keeps its checkpoints (no Ray needed)."""

from pathlib import Path

import pytest

from cluster.settings import load_settings
from train.scaling import needs_workers, resolve_workers
from train.train import checkpoint_directory


@pytest.mark.parametrize("setting, expected", [("0", 0), (" 2 ", 2), (3, 3)])
def test_a_worker_count_or_zero_for_local_mode(setting, expected):
    assert resolve_workers(setting, use_gpu=False) == expected


@pytest.mark.parametrize("setting", ["-1", "many", "1.5"])
def test_anything_else_is_refused_by_name(setting):
    with pytest.raises(ValueError, match="train.num_workers"):
        resolve_workers(setting, use_gpu=False)


@pytest.mark.parametrize("workers, use_gpu, cuda, expected", [
    ("0", "true", True, False),     # local mode asked for: no workers, whatever the GPUs
    ("2", "false", False, True),
    ("auto", "false", True, False),  # GPUs not to be used: local mode
    ("auto", "true", False, True),   # GPUs asked for: one worker per GPU
    ("auto", "auto", False, False),  # the defaults on a CPU machine: local mode
    ("auto", "auto", True, True),    # ... and where CUDA is
])
def test_whether_a_run_starts_workers_is_known_before_ray_runs(workers, use_gpu, cuda, expected):
    settings = load_settings({"RAYLOOP_TRAIN_NUM_WORKERS": workers, "RAYLOOP_TRAIN_USE_GPU": use_gpu})
    assert needs_workers(settings, cuda_available=cuda) is expected


def test_the_default_is_auto():
    assert load_settings({}).train.num_workers == "auto"


def test_with_workers_a_checkpoint_is_written_to_a_temporary_directory():
    with checkpoint_directory(None, 0) as directory:
        (Path(directory) / "state.pt").write_text("x")
    assert not Path(directory).exists()  # Ray Train copied it to run storage on report


def test_in_local_mode_the_latest_checkpoint_stays_and_older_ones_go(tmp_path):
    for epoch in range(3):
        with checkpoint_directory(str(tmp_path), epoch) as directory:
            (Path(directory) / "state.pt").write_text(str(epoch))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0002"]
    assert (tmp_path / "checkpoint_0002" / "state.pt").read_text() == "2"


def test_the_stream_buffer_caps_ray_datas_object_store_budget_for_ray_train_too():
    import ray.data

    from train.ingest import limit_buffer

    context = ray.data.DataContext.get_current()
    before = context.execution_options.resource_limits
    try:
        options = limit_buffer(96)
        assert context.execution_options.resource_limits.object_store_memory == 96 * 1024 ** 2
        assert options.resource_limits.object_store_memory == 96 * 1024 ** 2  # what the trainer carries
        with pytest.raises(ValueError, match="data.stream_buffer_mb"):
            limit_buffer(0)
    finally:
        context.execution_options.resource_limits = before


def test_without_a_gpu_device_node_cuda_is_ruled_out_before_torch_is_asked(monkeypatch):
    import torch

    from train import launch

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append(1) or True)
    monkeypatch.setattr(launch.os.path, "exists", lambda path: False)
    assert launch.cuda_possible() is False and not asked
    monkeypatch.setattr(launch.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    assert launch.cuda_possible() is True and asked  # a device node: torch decides


def test_a_validation_target_outside_0_to_1_is_refused_by_name():
    from train.model import ImageClassifier
    from train.train import TrainConfig, TrainingSets, make_trainer

    settings = load_settings({"RAYLOOP_TRAIN_TARGET_VAL_ACCURACY": "98"})
    with pytest.raises(ValueError, match="train.target_val_accuracy=98"):
        make_trainer(settings, TrainingSets(None, None, 0), ImageClassifier("cnn", ["a", "b"], 1, 28),
                     TrainConfig.from_settings(settings), name="x", num_workers=0, use_gpu=False)
