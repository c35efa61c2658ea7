"""Starting weights: a local torchvision state dict through vision_learner, and one clear line when
ImageNet weights cannot be downloaded (this machine has no internet: the failure is real)."""

from __future__ import annotations

import logging
import socket
import sys
import time

import pytest

from demo.synthetic import picture_dataloaders
from tests.learners import seed_website
from training.recipe import WeightsUnavailable, build_learner

MARK = 0.125  # every conv1 weight in the test's state dict: no initialisation produces it
OFFLINE_LIMIT_S = 60  # the download must fail fast, not hang


def _dls(tmp_path, size: int = 32):
    return picture_dataloaders(tmp_path, range(1, 17), size=size, bs=4, picture_size=(size, size))


def _state_dict(arch: str = "resnet18") -> dict:
    import torch
    from torchvision import models

    model = getattr(models, arch)(weights=None)
    with torch.no_grad():
        model.conv1.weight.fill_(MARK)
    return model.state_dict()


def test_a_local_state_dict_is_the_learners_body(tmp_path, make_settings):
    import torch
    from torchvision.models import resnet18

    state = _state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    settings = make_settings(train_arch="resnet18", train_weights=str(path), device="cpu")
    learn = build_learner(_dls(tmp_path), settings, workdir=tmp_path / "work")
    body = learn.model[0]
    assert torch.equal(body[0].weight, torch.full_like(body[0].weight, MARK))  # conv1
    assert torch.equal(body[4][0].conv1.weight, state["layer1.0.conv1.weight"])  # deeper in: layer1
    assert torch.equal(body[1].running_var, state["bn1.running_var"])  # buffers too
    # Frozen like a pretrained learner: the body's convolutions wait until unfreeze().
    assert not body[0].weight.requires_grad and all(p.requires_grad for p in learn.model[1].parameters())
    assert learn.arch is resnet18  # the export names torchvision's architecture, nothing of ours
    learn.export(tmp_path / "export.pkl")
    assert (tmp_path / "export.pkl").stat().st_size > 0


def test_a_state_dict_for_another_architecture_is_one_clear_line(tmp_path, make_settings):
    import torch

    torch.save(_state_dict("resnet34"), tmp_path / "resnet34.pth")
    settings = make_settings(train_arch="resnet18", train_weights=str(tmp_path / "resnet34.pth"))
    with pytest.raises(WeightsUnavailable, match=r"is not a state dict for resnet18: Unexpected key") as info:
        build_learner(_dls(tmp_path), settings, workdir=tmp_path / "work")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("content", "match"), [(None, "no such file"), (b"not a tensor file", "not a torch state dict")])
def test_a_missing_or_foreign_weights_file_is_refused(tmp_path, make_settings, content, match):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    settings = make_settings(train_arch="resnet18", train_weights=str(path))
    with pytest.raises(WeightsUnavailable, match=match):
        build_learner(_dls(tmp_path), settings, workdir=tmp_path / "work")


def _offline() -> bool:
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:
        return True
    return False


offline_only = pytest.mark.skipif(not _offline(), reason="download.pytorch.org resolves: this machine is online")


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """No cached weights: torchvision must try the download."""
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@offline_only
def test_no_imagenet_weights_offline_is_one_line_with_the_ways_out(tmp_path, make_settings, empty_torch_home):
    settings = make_settings(train_arch="resnet18", train_pretrained=True)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as info:
        build_learner(_dls(tmp_path), settings, workdir=tmp_path / "work")
    assert time.monotonic() - started < OFFLINE_LIMIT_S
    message = str(info.value)
    assert message.startswith("cannot download the ImageNet weights for resnet18 "
                              "(https://download.pytorch.org/models/resnet18-")
    assert "STILLTAG_TRAIN_PRETRAINED=false" in message and "STILLTAG_TRAIN_WEIGHTS=/path/to/resnet18.pth" in message
    assert "\n" not in message and info.value.__cause__ is None and info.value.__suppress_context__


@offline_only
@pytest.mark.timeout(300)
def test_train_now_offline_prints_the_line_and_the_task_returns_it(make_settings, empty_torch_home, caplog, capsys,
                                                                    monkeypatch):
    """``stilltag train --now`` through the command line's own entry point (in this process: a
    second Python importing fastai takes minutes on a busy 2-core machine), then the task."""
    from shared.config import get_settings
    from stilltag.cli import main
    from training import service

    settings = make_settings(train_arch="resnet18", train_image_size=32, train_batch_size=8, holdout_pct=20,
                             train_min_tag_images=2, device="cpu")
    seed_website(settings, 40, size=(32, 32))
    for name, value in {"STILLTAG_DATA_DIR": str(settings.data_dir), "STILLTAG_TRAIN_ARCH": "resnet18",
                        "STILLTAG_TRAIN_IMAGE_SIZE": "32", "STILLTAG_HOLDOUT_PCT": "20",
                        "STILLTAG_TRAIN_MIN_TAG_IMAGES": "2", "STILLTAG_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["stilltag", "train", "--now"])
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1
    errors = [line for line in err.splitlines() if line.strip() and "Warning" not in line
              and not line.startswith("  warnings.warn")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot download the ImageNet weights for resnet18"), err
    assert "Traceback" not in out + err and "STILLTAG_TRAIN_WEIGHTS" in errors[0]
    with capsys.disabled():
        print(f"\n{errors[0]}")  # the line as an admin sees it

    # The training worker's task: the same line in its log and its result, no traceback.
    service._worker_settings = settings
    try:
        with caplog.at_level(logging.ERROR, logger="training.service"):
            result = service.retrain_from_task()
    finally:
        service._worker_settings = None
    assert result.startswith("failed: cannot download the ImageNet weights for resnet18")
    assert result.removeprefix("failed: ") == errors[0].removeprefix("error: ")
    logged = [r for r in caplog.records if r.name == "training.service" and r.levelno == logging.ERROR]
    assert [r.getMessage() for r in logged] == [f"retrain failed: {result.removeprefix('failed: ')}"]
    assert all(r.exc_info is None for r in logged)
