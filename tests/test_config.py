"""DreamerV2Config: presets build, every hyperparameter is range-checked, --help documents each flag, action_repeat
reaches the environment."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import math
from pathlib import Path

import pytest

from torchrl_dreamer.config import PRESETS, DreamerV2Config
from torchrl_dreamer.envs import make_env

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dreamerv2_atari.py"
FIELDS = [f for f in dataclasses.fields(DreamerV2Config)]


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("dreamerv2_atari_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _atari_frame_skip(env) -> int:
    gym_env = env.base_env._env
    while not hasattr(gym_env, "frame_skip"):  # down to AtariPreprocessing
        gym_env = gym_env.env
    return gym_env.frame_skip


# ---------------------------------------------------------------- presets and validation


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = DreamerV2Config.preset(name)
    assert cfg.replace() == cfg and DreamerV2Config(**cfg.to_dict()) == cfg  # a saved config.json rebuilds


def test_every_field_documents_itself():
    for f in FIELDS:
        text = f.metadata.get("help", "")
        assert text and "\n" not in text, f.name


BAD = [
    ("gamma", 2.0), ("gamma", -0.1), ("gamma", math.nan), ("lmbda", 1.5), ("kl_balance", -0.2),
    ("actor_grad_mix", 2), ("lambda_kl", -1.0), ("lambda_reco", math.inf), ("lambda_reward", -1),
    ("lambda_discount", -5.0), ("free_nats", -0.5), ("entropy_scale", -1e-3), ("min_std", -0.1),
    ("weight_decay", -1e-6), ("model_lr", 0.0), ("actor_lr", -4e-5), ("critic_lr", math.inf), ("adam_eps", 0),
    ("max_grad_norm", 0.0), ("max_grad_norm", math.nan), ("action_repeat", 0), ("action_repeat", 2.5),
    ("action_repeat", True), ("num_envs", 0), ("num_categoricals", 0), ("num_classes", -1), ("rnn_hidden_dim", 0),
    ("hidden_dim", 0), ("cnn_depth", 0), ("mlp_units", 0), ("mlp_layers", 0), ("imagination_horizon", 1),
    ("target_update_interval", 0), ("total_steps", 0), ("total_steps", 5e7), ("prefill", -1), ("pretrain", -1),
    ("train_every", 0), ("batch_size", 0), ("batch_length", 1), ("replay_capacity", 0), ("eval_every", 0),
    ("eval_episodes", 0), ("eval_envs", 0), ("compile_policy", 1), ("episodes_by_length", "yes"), ("replay", "fifo"), ("final_eval_episodes", -1), ("log_every", 0), ("video_every", 0), ("checkpoint_every", -10), ("seed", -1),
    ("reward_transform", "clip"), ("actor_grad", "dynamic"), ("precision", "fp16"), ("discount_head", "yes"),
    ("prioritize_ends", 1), ("strict_length", None), ("compile", "yes"), ("cudagraph", 1), ("cnn_keys", "pixels,,x"),
    ("cnn_keys", 3),
    ("mlp_keys", "a,a"), ("env", ""), ("env_kwargs", ["x"]),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_value_raises_one_line_error_naming_the_field(name, value):
    for build in (lambda: DreamerV2Config.preset("atari", **{name: value}),
                  lambda: DreamerV2Config.preset("debug").replace(**{name: value})):
        with pytest.raises(ValueError) as info:
            build()
        message = str(info.value)
        assert message.startswith(f"{name} must be ") and "\n" not in message, message
        assert repr(value) in message  # the value given


def test_validated_fields_cover_every_hyperparameter():
    """Each field has at least one bad value in BAD (env_kwargs included)."""
    assert {f.name for f in FIELDS} == {name for name, _ in BAD}


@pytest.mark.parametrize("overrides,match", [
    (dict(num_envs=3), "train_every must be a multiple of num_envs"),
    (dict(replay_capacity=10, batch_length=50), "replay_capacity must be an integer >= batch_length"),
    (dict(cnn_keys="pixels", mlp_keys="pixels,observation"), "mlp_keys must be keys not also in cnn_keys"),
    (dict(env_kwargs={"frame_skip": 2}), "set action_repeat"),
    (dict(env="pkg.mod:make", env_kwargs={"a": 1}), "env_kwargs must be empty for the user env factory"),
])
def test_cross_field_constraints(overrides, match):
    with pytest.raises(ValueError, match=match):
        DreamerV2Config.preset("atari", **overrides)


def test_edge_values_are_accepted():
    cfg = DreamerV2Config.preset("atari", gamma=1, lmbda=0.0, kl_balance=1.0, free_nats=0, max_grad_norm=math.inf,
                                 prefill=0, pretrain=0, cnn_keys="", mlp_keys=" observation ", model_lr=1)
    assert cfg.gamma == 1 and cfg.max_grad_norm == math.inf


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_help_describes_every_hyperparameter_with_its_preset_value(cli, preset, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping: argparse would break "dmc:walker-walk" at its hyphen
    parser = cli.build_parser(preset)
    actions = {a.dest: a for a in parser._actions}
    for f in FIELDS:
        if f.name == "env_kwargs":  # set through --minimal-actions, not a flag
            continue
        action = actions[f.name]
        value = PRESETS[preset].get(f.name, f.default)
        assert action.help.startswith(f.metadata["help"]), f.name
        assert f"[{preset} preset: {cli._show(value)}]" in action.help, (f.name, action.help)
    text = " ".join(parser.format_help().split())
    assert f"[{preset} preset: {cli._show(PRESETS[preset].get('env', 'atari:Pong'))}]" in text
    assert f"--gamma FLOAT discount factor per agent step (in [0, 1]) [{preset} preset:" in text


def test_main_help_follows_the_preset(cli):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        cli.main(["--preset", "dmc", "--help"])
    assert info.value.code == 0
    text = " ".join(out.getvalue().split())
    assert "--gamma FLOAT discount factor per agent step (in [0, 1]) [dmc preset: 0.99]" in text
    assert "--action-repeat INT" in text and "[dmc preset: 2]" in text


def test_cli_refuses_out_of_range_values_in_one_line(cli, capsys):
    with pytest.raises(cli.UsageError) as info:
        cli.make_config(cli.build_parser().parse_args(["--gamma", "2"]))
    assert str(info.value) == "gamma must be a number in [0, 1], got 2.0."
    # from the command line: one line and exit status 2, as argparse's own errors
    assert cli.main(["--gamma", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: gamma must be a number in [0, 1], got 2.0."
    for bad in ("inf", "nan", "-inf"):  # counts that are not finite: argparse's one line, status 2
        with pytest.raises(SystemExit) as info:
            cli.main([f"--total-steps={bad}"])
        assert info.value.code == 2 and "expected a finite number" in capsys.readouterr().err


def test_debug_preset_beyond_a_smoke_test_says_so(cli):
    parse = cli.build_parser("debug").parse_args
    assert cli.notes(cli.make_config(parse(["--preset", "debug"])), "debug") == []
    [note] = cli.notes(cli.make_config(parse(["--preset", "debug", "--total-steps", "1e5"])), "debug")
    assert "smoke test" in note and "\n" not in note
    assert cli.notes(cli.make_config(parse(["--preset", "atari", "--total-steps", "1e5"])), "atari") == []


# ---------------------------------------------------------------- action_repeat reaches the env


@pytest.mark.parametrize("repeat", [1, 2, 4])
def test_action_repeat_is_the_atari_frame_skip(repeat):
    cfg = DreamerV2Config.preset("atari", env="atari:Pong", action_repeat=repeat)
    assert cfg.make_env_kwargs == {"action_repeat": repeat}
    env = make_env(cfg.env, seed=0, **cfg.make_env_kwargs)
    try:
        assert _atari_frame_skip(env) == repeat
    finally:
        env.close()


def test_action_repeat_keeps_the_other_env_kwargs_of_builtin_names(cli):
    cfg = cli.make_config(cli.build_parser().parse_args(["--game", "Pong", "--action-repeat", "2",
                                                         "--minimal-actions"]))
    assert cfg.make_env_kwargs == {"full_action_space": False, "action_repeat": 2}
    env = make_env(cfg.env, seed=0, **cfg.make_env_kwargs)
    try:
        assert _atari_frame_skip(env) == 2 and env.action_spec.shape[-1] < 18
    finally:
        env.close()


def test_action_repeat_for_catch_and_gym():
    cfg = DreamerV2Config.preset("debug", action_repeat=4)
    td = make_env(cfg.env, seed=0, **cfg.make_env_kwargs).rollout(100)
    assert td.shape == (4,) and td["next", "ball"][:, 0].tolist() == [4, 8, 12, 15]  # 15 frames: 4 + 4 + 4 + 3
    assert td["next", "reward"].abs().sum() == 1 and td["next", "done"][-1]
    cfg = DreamerV2Config.preset("debug", env="gym:CartPole-v1", action_repeat=500)
    td = make_env(cfg.env, seed=0, **cfg.make_env_kwargs).rollout(10)
    assert td.shape == (1,) and 1 < td["next", "reward"].item() < 500  # one agent step, a whole episode


def test_user_factory_is_not_wrapped_and_action_repeat_only_scales_the_logs(cli):
    """Policy: a user factory's env is built as is (it may skip frames itself, e.g. tests.user_envs:pong_gray);
    action_repeat is then the frames it does per step, used for the logged frames, and the CLI says so."""
    cfg = DreamerV2Config.preset("atari", env="tests.user_envs:dict_catch")
    assert not cfg.is_builtin_env and cfg.make_env_kwargs == {}
    [note] = cli.notes(cfg, "atari")
    assert "not wrapped" in note and "--action-repeat 4 only scales the logged frames" in note
    assert cli.notes(cfg.replace(action_repeat=1), "atari") == []
    assert "user env factory" in " ".join(cli.build_parser().format_help().split())
