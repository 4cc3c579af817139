"""Damaged checkpoints and failed saves (issue 41), on tiny_random.

A truncated or unparsable checkpoint file is named in one line when it is loaded (resume, ``evaluate.py``,
``from_pretrained``) — the structural check agrees with the real loaders cut by cut; ``resume_from=auto`` passes over
a damaged newest ``step-N`` and the resumed run equals the uninterrupted one. A save that fails (disk full: an
injected ``ENOSPC``, torch's ``unexpected pos``, a real small tmpfs where the machine allows mounting one; no
permission) is one line naming the path and the space needed, and the checkpoints already there stay byte-identical.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO_ROOT
from lbdpo.errors import DamagedCheckpointError, LbdpoError, SaveError
from lbdpo.integrity import damaged_files
from lbdpo.train import checkpoint
from lbdpo.train.trainer import train
from test_train import make_cfg, pairs_file, read_metrics  # noqa: F401  (pairs_file is a fixture)

STEPS = ("trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=0", "trainer.eval_every=0")


@pytest.fixture(scope="module")
def run6(pairs_file, tmp_path_factory):  # noqa: F811
    """A whole 6-step run: checkpoints step-2, step-4, final."""
    run_dir = tmp_path_factory.mktemp("run6")
    train(make_cfg(pairs_file, *STEPS), run_dir)
    return run_dir


def unfinished_copy(run6: Path, dst: Path) -> Path:
    """The run as if stopped after step 4's save (no final): what resume_from=auto continues."""
    shutil.copytree(run6, dst)
    shutil.rmtree(dst / "checkpoints" / "final")
    return dst


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


LOADERS = {
    ".safetensors": load_file,
    ".pt": lambda p: torch.load(p, map_location="cpu", weights_only=False),
    ".json": lambda p: json.loads(p.read_text()),
    ".yaml": lambda p: OmegaConf.create(p.read_text()),
}


def loads(path: Path) -> bool:
    try:
        LOADERS[path.suffix](path)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("name", ["beta_head.safetensors", "beta_head_config.json", "config.yaml", "config.json",
                                  "model.safetensors", "trainer_state.pt"])
def test_the_check_flags_a_file_exactly_when_its_loader_fails(run6, tmp_path, name):
    """Every cut of the small files (a sample of cut points for the large ones): the check flags the file unless the
    cut removed only trailing whitespace of a text file, and whatever the real loader refuses is flagged. (YAML cut at
    a line end still parses: a checkpoint's config.yaml is flagged by its missing sections / last key, seed.)"""
    original = run6 / "checkpoints" / "step-4" / name
    assert damaged_files(original.parent) == {} and loads(original)
    content, size = original.read_bytes(), original.stat().st_size
    if size < 1000:
        cuts = range(size)
    elif name.endswith((".json", ".yaml")):  # every 13th byte, and each of the last 64 (the last key's line)
        cuts = sorted(set(range(0, size, 13)) | set(range(size - 64, size)))
    else:
        cuts = sorted({0, 1, 7, 8, 9, 100, 4096, size // 3, size // 2, size - 1})
    folder = tmp_path / "ckpt"
    folder.mkdir()
    copy = folder / name
    for cut in cuts:
        shutil.copyfile(original, copy)
        truncate(copy, cut)
        flagged = damaged_files(folder)
        whole = copy.suffix in (".json", ".yaml") and content[:cut].rstrip() == content.rstrip()
        assert bool(flagged) == (not whole), (name, cut, flagged)
        assert flagged or loads(copy), (name, cut)  # nothing the loader refuses passes the check
        if copy.suffix in (".safetensors", ".pt"):
            assert not loads(copy), (name, cut)  # a truncated binary file: damaged for the loader too
    if copy.suffix == ".safetensors":  # bytes added at the end: the loader refuses them too
        shutil.copyfile(original, copy)
        with open(copy, "ab") as f:
            f.write(b"\0" * 16)
        assert "trailing bytes" in damaged_files(folder)[copy] and not loads(copy)


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt", "beta_head.safetensors"])
def test_resume_auto_passes_over_a_damaged_newest_checkpoint(run6, pairs_file, tmp_path, caplog, name):  # noqa: F811
    run_dir = unfinished_copy(run6, tmp_path / "run")
    damaged = run_dir / "checkpoints" / "step-4" / name
    truncate(damaged, damaged.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        train(make_cfg(pairs_file, *STEPS, "trainer.resume_from=auto"), run_dir)
    notes = [r.getMessage() for r in caplog.records if "passing over damaged" in r.getMessage()]
    assert len(notes) == 1 and f"step-4: {damaged} is damaged (truncated" in notes[0]
    assert "resuming from step-2, the newest intact one" in notes[0]
    resumed, uninterrupted = read_metrics(run_dir)[0], read_metrics(run6)[0]
    assert [s["step"] for s in resumed] == [1, 2, 3, 4, 5, 6]  # steps 3, 4 redone once, nothing appended
    assert [s["loss"] for s in resumed] == pytest.approx([s["loss"] for s in uninterrupted], abs=1e-5)
    assert damaged_files(run_dir / "checkpoints" / "step-4") == {}  # the step-4 written again is whole


def test_only_damaged_checkpoints_start_over_and_an_explicit_damaged_one_is_refused(run6, pairs_file, tmp_path,  # noqa: F811
                                                                                    caplog):
    run_dir = unfinished_copy(run6, tmp_path / "run")
    for step in (2, 4):
        truncate(run_dir / "checkpoints" / f"step-{step}" / "trainer_state.pt", 1000)
    with pytest.raises(DamagedCheckpointError) as err:  # an explicit path: refused before anything loads
        train(make_cfg(pairs_file, *STEPS, f"trainer.resume_from={run_dir / 'checkpoints' / 'step-4'}"), run_dir)
    message = str(err.value)
    assert message.startswith(f"{run_dir / 'checkpoints' / 'step-4' / 'trainer_state.pt'} is damaged (truncated")
    assert "trainer.resume_from=auto" in message and "\n" not in message
    assert isinstance(err.value, OSError) and isinstance(err.value, LbdpoError)
    with caplog.at_level(logging.WARNING):
        train(make_cfg(pairs_file, *STEPS, "trainer.resume_from=auto"), run_dir)
    assert any("found only damaged checkpoints (step-2, step-4); starting from step 0" in r.getMessage()
               for r in caplog.records)
    steps = read_metrics(run_dir)[0]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]  # the earlier attempt's metrics cleared, not appended
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in read_metrics(run6)[0]], abs=1e-5)


def test_a_file_whole_in_structure_that_its_loader_refuses_is_named(run6, pairs_file, tmp_path):  # noqa: F811
    """Damage the size check cannot see (a tensor's dtype made unknown, sizes unchanged): the loader's failure becomes
    the same one line."""
    run_dir = unfinished_copy(run6, tmp_path / "run")
    head = run_dir / "checkpoints" / "step-4" / "beta_head.safetensors"
    data = head.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"F32"', b'"Q99"')
    assert len(header) == n and header != data[8:8 + n]
    head.write_bytes(data[:8] + header + data[8 + n:])
    assert damaged_files(head.parent) == {}  # structurally whole
    with pytest.raises(DamagedCheckpointError, match=rf"^{head} is damaged \(cannot be read: SafetensorError"):
        train(make_cfg(pairs_file, *STEPS, f"trainer.resume_from={head.parent}"), run_dir)


def test_evaluate_and_from_pretrained_name_the_damaged_file(run6, tmp_path):
    from lbdpo import AutoModelForCausalLMWithBetaHead

    ckpt = tmp_path / "step-4"
    shutil.copytree(run6 / "checkpoints" / "step-4", ckpt)
    (ckpt / "beta_head_config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(DamagedCheckpointError, match=r"beta_head_config.json is damaged \(does not parse"):
        AutoModelForCausalLMWithBetaHead.from_pretrained(ckpt)
    shutil.copyfile(run6 / "checkpoints" / "step-4" / "beta_head_config.json", ckpt / "beta_head_config.json")
    truncate(ckpt / "model.safetensors", 6_000_000)
    out = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate.py"), f"checkpoint={ckpt}",
                          f"output_dir={tmp_path / 'eval'}", f"hydra.run.dir={tmp_path / 'logs'}"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {ckpt / 'model.safetensors'} is damaged (truncated: 6000000 bytes, its header describes "
        f"{(run6 / 'checkpoints' / 'step-4' / 'model.safetensors').stat().st_size}); evaluate another checkpoint of "
        "the run (checkpoints/step-N or final), or copy this one again")
    assert not (tmp_path / "eval").exists() or not list((tmp_path / "eval").glob("eval*"))


# ---------------------------------------------------------------------------------------------- failed saves


def fail_second_save(monkeypatch, owner, name: str, error: BaseException, seen: dict) -> None:
    """Make ``owner.name`` (torch.save, or the model's save_pretrained) write a partial file in the second checkpoint
    save (step-4), then raise ``error``; ``seen["before"]``: the step-2 folder's checksums at that moment."""
    real, calls = getattr(owner, name), {"n": 0}

    def failing(*args, **kwargs):
        folder = Path(args[1]).parent if name == "save" else Path(args[1])
        if folder.name.startswith(".tmp-step-"):
            calls["n"] += 1
            if calls["n"] == 2:
                seen["before"] = md5s(folder.parent / "step-2")
                (folder / "partial.bin").write_bytes(b"PK\x03\x04 partial")
                raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("kind", ["ENOSPC", "unexpected pos", "safetensors"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoint(pairs_file, tmp_path, monkeypatch,  # noqa: F811
                                                                                 kind):
    from lbdpo.modeling import AutoModelForCausalLMWithBetaHead

    seen: dict = {}
    if kind == "ENOSPC":  # what Python's own writes raise
        fail_second_save(monkeypatch, torch, "save", OSError(errno.ENOSPC, "No space left on device"), seen)
    elif kind == "unexpected pos":  # what torch.save raises when the disk fills: no errno, the free space decides
        fail_second_save(monkeypatch, torch, "save", RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 15680 vs 15572"), seen)
        real_usage = shutil.disk_usage
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1 << 20))
    else:  # what safetensors (the model weights) raises, measured on a full tmpfs
        from safetensors import SafetensorError

        fail_second_save(monkeypatch, AutoModelForCausalLMWithBetaHead, "save_pretrained", SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"), seen)
    with pytest.raises(SaveError) as err:
        train(make_cfg(pairs_file, *STEPS), tmp_path)
    step2 = tmp_path / "checkpoints" / "step-2"
    needed = checkpoint.human(checkpoint.folder_bytes(step2))
    message = str(err.value)
    assert message.startswith(f"could not write checkpoint {tmp_path / 'checkpoints' / 'step-4'}: no space left on "
                              "the device (")
    assert f"a checkpoint of this run needs about {needed}" in message and "free on" in message
    assert message.endswith("the checkpoints already there (step-2) are intact") and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]  # no .tmp-* left
    assert md5s(step2) == seen["before"] and damaged_files(step2) == {}


def test_which_save_errors_are_translated(tmp_path, monkeypatch):
    """A write failure of any kind is one line naming the path; torch's writer error is "no space" only when the free
    space is short; an error that is not about writing (a bug) is left alone, with its traceback."""
    path = tmp_path / "checkpoints" / "step-4"
    path.parent.mkdir(parents=True)
    real_usage = shutil.disk_usage
    pos = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15680 vs 15572")
    for free, needed, full in ((1 << 20, 2 << 20, True), (3 << 20, 2 << 20, False)):
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=free))
        message = str(checkpoint.save_failure(pos, path, needed))
        assert ("no space left on the device" in message) == full, message
        assert message.startswith(f"could not write checkpoint {path}")
        assert full or "(RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos" in message
    denied = checkpoint.save_failure(PermissionError(errno.EACCES, "Permission denied", str(path)), path, 10)
    assert isinstance(denied, SaveError) and f"(Permission denied: {path})" in str(denied)
    assert "no space" not in str(denied)
    for bug in (RuntimeError("shape mismatch: [4, 8] vs [4, 9]"), ValueError("too many values to unpack"),
                KeyError("optimizer")):
        assert checkpoint.save_failure(bug, path, 10) is None


def can_mount_tmpfs(where: Path) -> bool:
    where.mkdir()
    if shutil.which("mount") is None or getattr(__import__("os"), "geteuid")() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk(tmp_path):
    """A 60 MB tmpfs holds one checkpoint of this run (about 41 MB), not two: the second save fills it. Needs root
    (mount); skipped elsewhere."""
    disk = tmp_path / "disk"
    if not can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        data = tmp_path / "pairs.jsonl"
        from conftest import write_item_pairs

        write_item_pairs(data)
        run_dir = disk / "run"
        out = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "model=tiny_random", "trainer=tiny",
                              "logger=none", "data=jsonl", f"data.path={data}", "data.max_length=48",
                              "data.max_prompt_length=32", "data.eval_size=8", "data.eval_fraction=null", *STEPS,
                              f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out.stderr[-2000:]
        line = errors[0]
        assert line.startswith(f"error: could not write checkpoint {run_dir / 'checkpoints' / 'step-4'}: no space "
                               "left on the device (") and line.endswith("(step-2) are intact"), line
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
        assert damaged_files(run_dir / "checkpoints" / "step-2") == {}
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
