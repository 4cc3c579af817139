"""Issue 41: a write of evaluation results that fails (disk full, another OS error) ends in one SaveError line naming
the folder, its free space and what to do; the staging folder is removed and the previous complete set stays byte for
byte (src/lbdpo/eval/output.py). The full disk is an injected OSError(ENOSPC) in a writer: in process, and once
through evaluate.py in a real subprocess (exit 2, one line)."""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from lbdpo.errors import RunStateError, SaveError
from lbdpo.eval import output
from lbdpo.eval.evaluate import evaluate_checkpoint
from lbdpo.eval.output import EVAL_FILES, commit, owned_eval_dir, write_failure
from lbdpo.train.checkpoint import human
from test_eval_ownership import checksums, ckpt, data, eval_cfg, lines  # noqa: F401 — ckpt, data: fixtures

FULL = OSError(errno.ENOSPC, "No space left on device")
FAIL = '''import errno, runpy, sys
import lbdpo.eval.evaluate as e
def full(per_pair, path):
    path.write_bytes(b"x" * 4096)  # part of the file written, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")
e.write_eval_pairs = full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture
def previous(ckpt, tmp_path):  # noqa: F811 — the fixture imported above
    """An output folder holding a complete evaluation (preference, generation, report, figures); its checksums."""
    out = tmp_path / "eval"
    evaluate_checkpoint(eval_cfg(ckpt, out))
    sums = checksums(out)
    assert {"eval.json", "eval_pairs.jsonl", "samples.jsonl", "eval_report.md", "beta_hist_by_domain.png"} <= set(sums)
    return out, sums


@pytest.fixture
def previous_small(ckpt, tmp_path):  # noqa: F811
    """A complete evaluation without generation and figures (cheaper); its folder and checksums."""
    out = tmp_path / "eval"
    evaluate_checkpoint(eval_cfg(ckpt, out, "generation.enabled=false", "plots=false"))
    return out, checksums(out)


def set_bytes(out: Path) -> int:
    return sum((out / n).stat().st_size for n in EVAL_FILES if (out / n).is_file())


def fixed_free(monkeypatch, free: int) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free))


def test_disk_full_in_a_writer_is_one_line_and_keeps_the_previous_set(ckpt, previous, monkeypatch):  # noqa: F811
    out, before = previous
    staged = []

    def full(per_pair, path):
        staged.append(path.parent)
        path.write_bytes(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lbdpo.eval.evaluate.write_eval_pairs", full)
    fixed_free(monkeypatch, 3 * 1024 ** 2)
    with pytest.raises(SaveError) as err:
        evaluate_checkpoint(eval_cfg(ckpt, out, "seed=5"))
    assert str(err.value) == (
        f"could not write the evaluation results into {out}: no space left on the device (3.0 MB free on {out}; an "
        f"evaluation's files take about {human(set_bytes(out))}); free some space or give output_dir= a folder on a "
        f"larger disk, then evaluate again; {out} keeps the previous complete results")
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert checksums(out) == before  # eval.json, samples, report, figures: byte-identical
    assert staged and staged[0].parent == out and not staged[0].exists()  # the staging folder is gone
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".eval.lock"]


def test_disk_full_in_an_optional_section_stops_rather_than_skipping(ckpt, previous, monkeypatch):  # noqa: F811
    """Plots (like generation) record an ordinary failure as a skipped section; a full disk stops the evaluation."""
    out, before = previous

    def plots_fail(err):
        def make_plots(*args):
            raise err
        return make_plots

    monkeypatch.setattr("lbdpo.eval.evaluate.make_plots", plots_fail(ValueError("no figure")))
    data = evaluate_checkpoint(eval_cfg(ckpt, out, "generation.enabled=false"))  # an ordinary failure: a skip  # noqa: F811
    assert data["skipped"]["plots"] == "ValueError: no figure" and data["figures"] == {}
    before = checksums(out)
    monkeypatch.setattr("lbdpo.eval.evaluate.make_plots", plots_fail(RuntimeError("Error while writing: No space "
                                                                                  "left on device (os error 28)")))
    with pytest.raises(SaveError, match="^" + re.escape(f"could not write the evaluation results into {out}: no")):
        evaluate_checkpoint(eval_cfg(ckpt, out, "generation.enabled=false"))
    assert checksums(out) == before and not list(out.glob(".eval-tmp-*"))


def test_evaluate_py_on_a_full_disk_exits_2_with_one_line(ckpt, previous_small, tmp_path):  # noqa: F811
    out, before = previous_small
    wrapper = tmp_path / "full.py"
    wrapper.write_text(FAIL)
    proc = subprocess.run([sys.executable, str(wrapper), str(REPO_ROOT / "evaluate.py"), f"checkpoint={ckpt}",
                           f"output_dir={out}", f"hydra.run.dir={tmp_path / 'logs'}", "generation.enabled=false"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    last = lines(proc.stderr)[-1]
    assert last.startswith(f"error: could not write the evaluation results into {out}: no space left on the device (")
    assert f" free on {out}; " in last and last.endswith(f"{out} keeps the previous complete results")
    assert checksums(out) == before and not list(out.glob(".eval-tmp-*"))


def test_a_real_full_disk(ckpt, previous, tmp_path):  # noqa: F811
    """A tmpfs that holds the previous set and half of another: the re-evaluation fills it wherever it writes, one
    SaveError line, the previous set byte-identical. Needs root (mount); skipped elsewhere."""
    from test_damaged_checkpoint import can_mount_tmpfs

    src, before = previous
    pages = sum(-(-p.stat().st_size // 4096) * 4096 for p in src.iterdir() if p.is_file())
    disk = tmp_path / "disk"
    if not can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        subprocess.run(["mount", "-o", f"remount,size={(pages + pages // 2) // 1024}k", str(disk)], check=True)
        out = disk / "eval"
        shutil.copytree(src, out)
        assert checksums(out) == before
        with pytest.raises(SaveError) as err:
            evaluate_checkpoint(eval_cfg(ckpt, out))
        assert str(err.value).startswith(f"could not write the evaluation results into {out}: no space left on the "
                                         f"device (") and f" free on {out}; " in str(err.value)
        assert str(err.value).endswith(f"{out} keeps the previous complete results")
        assert checksums(out) == before and not list(out.glob(".eval-tmp-*"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_failed_rename_in_the_commit_puts_the_old_set_back(tmp_path, monkeypatch):
    """Any rename of the commit failing (here the 2nd of the new set, after the old set was moved aside): the old
    set is back in place byte for byte, the new one gone with the staging folder, one line naming the error."""
    out = tmp_path / "eval"
    out.mkdir()
    for name in ("eval.json", "samples.jsonl", "beta_vs_log_ppl.png"):
        (out / name).write_text(f"old {name}")
    before = checksums(out)
    real, calls = output.os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).parent.name))
        if len(calls) == 5:  # 3 old files aside, 1 new one in, then the 2nd new one fails
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    fixed_free(monkeypatch, 5 * 1024 ** 3)
    with pytest.raises(SaveError) as err:
        with owned_eval_dir(out) as staging:
            for name in ("eval.json", "eval_pairs.jsonl", "eval_report.md"):
                (staging / name).write_text(f"new {name}")
            commit(staging, out)
    assert calls[4] == ("eval_report.md", "eval") and len(calls) == 5 + 4  # 1 new file back to staging, 3 old back
    assert str(err.value) == (
        f"could not write the evaluation results into {out} (Input/output error: {out / 'eval_report.md'}); check "
        f"that {out} is writable (5.0 GB free; an evaluation's files take about {human(set_bytes(out))}) or give "
        f"output_dir= another folder, then evaluate again; {out} keeps the previous complete results")
    assert checksums(out) == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".eval.lock"]


def test_write_failure_names_what_failed_and_leaves_other_errors_alone(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    out.mkdir()
    fixed_free(monkeypatch, 2048)
    elsewhere = tmp_path / "cache" / "reference" / "x.arrow"
    full_elsewhere = OSError(errno.ENOSPC, "No space left on device", str(elsewhere))
    assert str(write_failure(full_elsewhere, out)) == (
        f"could not write {elsewhere}: no space left on the device (2.0 KB free on {tmp_path}); free some space or "
        f"give output_dir= a folder on a larger disk, then evaluate again; {out} keeps the previous complete results "
        "(none: it holds no eval.json)")
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(write_failure(quota, out, written=5000)).startswith(
        f"could not write the evaluation results into {out}: no space left on the device (2.0 KB free on {out}; an "
        "evaluation's files take about 4.9 KB); ")
    denied = PermissionError(errno.EACCES, "Permission denied", str(out / ".eval-tmp-1-x" / "eval.json"))
    assert "(Permission denied: " in str(write_failure(denied, out))
    assert write_failure(FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "data.jsonl")), out) is None
    assert write_failure(RunStateError(f"{out} is in use"), out) is None  # already one line
    assert write_failure(ValueError("a bug"), out) is None  # keeps its traceback


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path):
    """The folder's lock file cannot be created or opened (here a folder sits at its name; a read-only folder is the
    same path, and root may write there anyway): the same one line, the previous results untouched."""
    out = tmp_path / "eval"
    (out / ".eval.lock").mkdir(parents=True)
    (out / "eval.json").write_text("{}")
    with pytest.raises(SaveError) as err:
        with owned_eval_dir(out):
            pass
    assert str(err.value).startswith(f"could not write the evaluation results into {out} (Is a directory: "
                                     f"{out / '.eval.lock'}); check that {out} is writable (")
    assert str(err.value).endswith(f"{out} keeps the previous complete results")
    assert sorted(p.name for p in out.iterdir()) == [".eval.lock", "eval.json"]
