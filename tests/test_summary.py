"""The multirun summary reads each run's last eval metrics and overrides."""

import json

from lbdpo.summary import collect, main, markdown_table


def fake_run(root, name, overrides, acc, finished=True):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    lines = [{"step": 1, "loss": 0.69, "beta_head/w": 0.01}, {"step": 2, "eval/loss": 0.6, "eval/rewards/accuracies": 0.5},
             {"step": 4, "loss": 0.5, "beta_head/w": 0.02}, {"step": 4, "eval/loss": 0.4, "eval/rewards/accuracies": acc}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines) + '{"step": 5, "lo')
    if finished:
        (d / "checkpoints" / "final").mkdir(parents=True)


def test_summary_table(tmp_path, capsys):
    fake_run(tmp_path, "0_arm=a", ["+arm=fixed_b01"], 0.7)
    fake_run(tmp_path, "1_arm=b", ["+arm=learn_eps01"], 0.8, finished=False)
    (tmp_path / "not_a_run").mkdir()
    runs = collect(tmp_path)
    assert [r["acc"] for r in runs] == [0.7, 0.8] and [r["finished"] for r in runs] == [True, False]
    assert runs[0]["w"] == 0.02 and runs[0]["step"] == 4
    table = markdown_table(runs)
    assert "+arm=fixed_b01" in table and "0.8000" in table
    main([str(tmp_path), "--markdown"])
    assert "+arm=learn_eps01" in capsys.readouterr().out
