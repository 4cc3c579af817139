"""Every option of every Hydra group composes, and the composed values build valid components."""

from __future__ import annotations


import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT
from lbdpo.beta_head import BetaHeadConfig
from lbdpo.build import to_container
from lbdpo.data.tokenize import TokenizeConfig
from lbdpo.train.checks import check_trainer_config

CONF = REPO_ROOT / "conf"
GROUPS = ["model", "beta_head", "data", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    extra = {("data", "jsonl"): ["data.path=/tmp/x.jsonl"],  # the options a user must give
             ("beta_head", "schedule"): ["beta_head.schedule=[[0, 0.1], [100, 0.3]]"],
             ("beta_head", "per_domain"): ["beta_head.domain_betas={en_garbled: 1.0}"]}.get((group, option), [])
    cfg = compose_with(f"{group}={option}", *extra)
    BetaHeadConfig.from_mapping(to_container(cfg.beta_head), hidden_size=8)
    TokenizeConfig(prompt_format=cfg.data.prompt_format, max_length=cfg.data.max_length,
                   max_prompt_length=cfg.data.max_prompt_length)
    check_trainer_config(cfg.trainer)
    assert cfg.model.source in ("hub", "smollm2_gguf", "tiny_random")
    assert cfg.logger.backend in ("wandb", "tensorboard", "none")
    assert to_container(cfg.data.train)  # sources resolve (interpolations included)


@pytest.mark.parametrize("arm", sorted(p.stem for p in (CONF / "arm").glob("*.yaml")))
def test_sweep_arms_compose(arm):
    cfg = compose_with(f"+arm={arm}")
    head = BetaHeadConfig.from_mapping(to_container(cfg.beta_head), hidden_size=8)
    assert head.mode == ("fixed" if arm.startswith("fixed") else "beta_dpo" if arm == "beta_dpo" else "learnable")


def test_readme_example_and_named_sweeps_compose():
    cfg = compose_with("beta_head=mlp", "beta_head.epsilon=0.1")
    assert cfg.beta_head.context_net_type == "mlp" and cfg.beta_head.epsilon == 0.1
    for sweep in sorted(p.stem for p in (REPO_ROOT / "sweeps").glob("*.yaml")):
        cfg = compose_with(f"+sweep={sweep}")
        assert cfg.experiment.startswith("sweep_")


def test_bad_beta_head_override_names_key():
    cfg = compose_with("beta_head.epsilon=1.5")
    with pytest.raises(ValueError, match=r"beta_head\.epsilon"):
        BetaHeadConfig.from_mapping(to_container(cfg.beta_head), hidden_size=8)


def test_multirun_dir_names_pass_unquoted_as_override_values():
    """A sweep's run dir (named by hydra.job.config.override_dirname) must be usable as `checkpoint=PATH` /
    `trainer.resume_from=PATH`: Hydra's override grammar rejects an unquoted "=" or ","."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    naming = OmegaConf.load(CONF / "config.yaml").hydra.job.config.override_dirname
    parser = OverridesParser.create()
    overrides = parser.parse_overrides(["+arm=fixed_b01", "seed=1", "beta_head.epsilon=0.3", "+sweep=cpu_small",
                                        "trainer.resume_from=auto"])
    name = get_overrides_dirname(overrides, list(naming.exclude_keys), naming.item_sep, naming.kv_sep)
    assert name == "+arm-fixed_b01__beta_head.epsilon-0.3__seed-1"
    path = f"outputs/multirun/sweep_cpu_small/2026-01-01_00-00-00/0_{name}/checkpoints/final"
    assert parser.parse_overrides([f"checkpoint={path}"])[0].value() == path


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_files_compose(path):
    """Every run of an experiment file composes (common + arm overrides), and so does each of its evaluations."""
    from lbdpo.experiment import Experiment

    exp = Experiment.load(path)
    for arm, overrides in exp.arms.items():
        cfg = compose_with(*exp.common, *overrides, "seed=0")
        BetaHeadConfig.from_mapping(to_container(cfg.beta_head), hidden_size=8)
        check_trainer_config(cfg.trainer)
    for name, overrides in exp.evaluate.items():
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("evaluate", overrides=["checkpoint=x", *overrides])
        data = cfg.get("data")  # absent: evaluate.py uses the checkpoint's own data config
        assert data is None or to_container(data.eval or data.train), name
