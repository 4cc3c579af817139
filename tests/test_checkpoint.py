

def test_repair_restores_a_checkpoint_whose_replacement_never_landed(tmp_path):
    """A kill between moving step-3 aside (.old-step-3) and renaming its replacement in: step-3 comes back."""
    from lbdpo.train.checkpoint import list_step_checkpoints, repair_checkpoint_dir

    old = tmp_path / ".old-step-3"
    old.mkdir()
    (old / "trainer_state.pt").write_bytes(b"x")
    (tmp_path / ".tmp-step-3-xyz").mkdir()
    (tmp_path / "step-2").mkdir()
    (tmp_path / "step-2" / "trainer_state.pt").write_bytes(b"x")
    (tmp_path / ".old-step-2").mkdir()  # its replacement landed: the old copy is garbage
    done = repair_checkpoint_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    assert [n for n, _ in list_step_checkpoints(tmp_path)] == [2, 3]
    assert len(done) == 3 and any("restored step-3" in d for d in done)
