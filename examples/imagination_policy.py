"""A stock TorchRL loss trains a policy inside a DreamerV2 world model; the policy then plays the real game.

    python examples/imagination_policy.py                      # about 1.5 min on 1 CPU thread
    python examples/imagination_policy.py --seed 1 --episodes 100

1. **World model.** :func:`~torchrl_dreamer.trainers.make_dreamerv2_trainer` runs DreamerV2 on Catch (8 x 8 grid,
   each cell a 2 x 2 pixel block: 16 x 16 frames). Its collector fills the replay with ``--steps`` agent steps of
   random actions (the prefill), then the trainer's ``pretrain`` phase makes ``--model-updates`` updates on that
   replay. Only the world model is used below (the trainer also trains its own DreamerV2 actor and critic, with a
   short imagination horizon to keep that cheap; they are ignored).
2. **User actor and critic.** A :class:`~torchrl.modules.ProbabilisticActor` over a plain MLP reading the model
   state ``state``/``belief`` with a :class:`~torchrl.modules.distributions.OneHotCategorical`, and a
   :class:`~torchrl.modules.ValueOperator` on the same inputs; nothing DreamerV2-specific.
3. **Imagination.** :class:`~torchrl_dreamer.envs.imagination.DreamerV2ImaginationEnv` is a TorchRL env whose
   step is the world model's prior step plus its reward and discount heads. Each iteration takes the posterior
   states of a replay batch (the world-model loss returns them), drops the terminal ones, and rolls the user actor
   out for ``--horizon`` steps (trajectories that the model ends restart from their start state, as in a real env
   with ``break_when_any_done=False``). The ``[N, H]`` rollout goes, as it is, to TorchRL's
   :class:`~torchrl.objectives.A2CLoss` with its stock GAE estimator. The real env is never stepped here.
4. **Real game.** :class:`~torchrl_dreamer.modules.DreamerV2Policy` wraps the world model's encoder and posterior
   step around the user actor; it plays ``--episodes`` greedy episodes (the actor's mode) of the real Catch.

A policy that ignores the ball catches it with probability 3/8 on this grid, a mean return of -0.25 (see
``tests/test_imagination_policy.py``); a policy that follows the ball scores +1.

``main`` returns a dict of results and prints it as one JSON line; ``--logdir`` holds the DreamerV2 run (run again
on the same directory to reuse its trained world model).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any, Sequence

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, ValueOperator
from torchrl.modules.distributions import OneHotCategorical
from torchrl.objectives import A2CLoss, ValueEstimators

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.envs import CatchEnv, prepare_env
from torchrl_dreamer.envs.imagination import DreamerV2ImaginationEnv
from torchrl_dreamer.modules import DreamerV2Policy, RSSMPosteriorStepV2
from torchrl_dreamer.trainers import make_dreamerv2_trainer

GRID, SCALE = 8, 2  # Catch on an 8 x 8 grid drawn as 16 x 16 pixels: 7 steps per episode

# A small DreamerV2 for the 16 x 16 frames of Catch (smaller than the `small` preset: 7-step episodes).
WORLD_MODEL = dict(
    env=f"catch:{GRID}",
    env_kwargs={"scale": SCALE},
    num_categoricals=8,
    num_classes=8,
    rnn_hidden_dim=64,
    hidden_dim=64,
    cnn_depth=16,
    mlp_units=64,
    mlp_layers=2,
    model_lr=3e-3,
    batch_size=16,
    batch_length=8,  # an episode is 8 observations: each sequence is a whole episode
    imagination_horizon=2,  # the trainer's own actor and critic are not used here: keep their updates cheap
    eval_every=10**9,
    video_every=10**9,
    checkpoint_every=10**9,
    log_every=10**9,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000,
                        help="agent steps of random actions collected for the world model (budget)")
    parser.add_argument("--model-updates", type=int, default=1500, help="world-model updates on the replay")
    parser.add_argument("--policy-updates", type=int, default=300, help="A2C updates in imagination")
    parser.add_argument("--horizon", type=int, default=8, help="imagination horizon of the A2C rollouts")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the user actor and critic")
    parser.add_argument("--entropy-coeff", type=float, default=0.1,
                        help="A2C entropy bonus (0.01 let one seed's actor settle on never catching column 7)")
    parser.add_argument("--episodes", type=int, default=50, help="greedy episodes in the real env")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default=None, help="the DreamerV2 run directory (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for these tiny networks); 0 keeps torch's default")
    return parser.parse_args(argv)


def train_world_model(args: argparse.Namespace, logdir: str):
    """(a) DreamerV2 on Catch through the project's trainer: random prefill, then ``pretrain`` updates."""
    config = DreamerV2Config.preset(
        "debug", **WORLD_MODEL, seed=args.seed,
        total_steps=args.steps, prefill=args.steps, pretrain=args.model_updates, train_every=50,
    )
    trainer = make_dreamerv2_trainer(config, logdir, device="cpu", progress=False)
    counters = trainer.train()
    return trainer, counters


def make_user_actor_critic(world_model, action_spec) -> tuple[ProbabilisticActor, ValueOperator]:
    """(b) A plain TorchRL actor and critic reading the model state (TorchRL's MLP concatenates its inputs)."""
    features = world_model.rssm.state_dim + world_model.rssm.rnn_hidden_dim

    def mlp(out_features: int) -> MLP:
        return MLP(in_features=features, out_features=out_features, num_cells=[64, 64], activation_class=nn.ELU)

    actor = ProbabilisticActor(
        TensorDictModule(mlp(action_spec.shape[-1]), in_keys=["state", "belief"], out_keys=["logits"]),
        in_keys=["logits"],
        out_keys=["action"],
        spec=action_spec,
        distribution_class=OneHotCategorical,
    )
    critic = ValueOperator(mlp(1), in_keys=["state", "belief"])  # writes "state_value"
    return actor, critic


def train_in_imagination(trainer, actor, critic, action_spec, args: argparse.Namespace) -> dict[str, float]:
    """(c) A2C with GAE, on rollouts of the user actor in the world model only."""
    env = DreamerV2ImaginationEnv(trainer.models.world_model, action_spec)  # terminated = learned discount < 0.5
    loss = A2CLoss(actor, critic, entropy_coeff=args.entropy_coeff, critic_coeff=0.5, loss_critic_type="l2")
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.99, lmbda=0.95)
    optimizer = torch.optim.Adam(loss.parameters(), lr=args.lr)
    imagined_return = entropy = None
    for _ in range(args.policy_updates):
        batch = trainer.replay_buffer.sample()  # [B, T] sequences of real transitions
        with torch.no_grad():  # A2C recomputes the log-probabilities and values itself
            _, posteriors = trainer.loss_module.model_loss(batch)  # state, belief: [B, T, ...]
            starts = env.start_states(posteriors)  # [B * T], detached
            starts = starts[~env.heads(starts.clone()).get("terminated").squeeze(-1)]  # no terminal start
            with set_exploration_type(ExplorationType.RANDOM):
                rollout = env.rollout(args.horizon, actor, auto_reset=False, tensordict=env.reset(starts),
                                      break_when_any_done=False)  # [N, H]
        losses = loss(rollout)
        total = losses["loss_objective"] + losses["loss_critic"] + losses["loss_entropy"]
        optimizer.zero_grad()
        total.backward()
        nn.utils.clip_grad_norm_(loss.parameters(), 10.0)
        optimizer.step()
        imagined_return = rollout.get(("next", "reward")).sum(1).mean().item()
        entropy = losses["entropy"].item()
    return {"imagined_reward_per_rollout": imagined_return, "actor_entropy": entropy}


@torch.no_grad()
def evaluate(world_model, actor, *, episodes: int, seed: int) -> dict[str, Any]:
    """(d) The user actor in the real Catch behind the world model's encoder and posterior step, greedily."""
    policy = DreamerV2Policy(world_model.module[0], RSSMPosteriorStepV2(world_model.rssm), actor)
    env = prepare_env(CatchEnv(size=GRID, scale=SCALE, seed=seed), policy.make_tensordict_primer())
    returns, columns = [], []
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(episodes):
            episode = env.rollout(4 * GRID, policy)  # stops at the end of the episode
            returns.append(episode.get(("next", "reward")).sum().item())
            columns.append(int(episode.get("ball")[0, 1]))
    env.close()
    return {"greedy_return": sum(returns) / len(returns), "returns": returns, "ball_columns": columns}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logdir = args.logdir if args.logdir is not None else tempfile.mkdtemp(prefix="imagination_policy_")
    start = time.perf_counter()
    trainer, counters = train_world_model(args, logdir)
    model_seconds = time.perf_counter() - start

    action_spec = CatchEnv(size=GRID, scale=SCALE).action_spec  # the real env's OneHot(3)
    torch.manual_seed(args.seed)
    actor, critic = make_user_actor_critic(trainer.models.world_model, action_spec)
    start = time.perf_counter()
    imagination = train_in_imagination(trainer, actor, critic, action_spec, args)
    policy_seconds = time.perf_counter() - start

    evaluation = evaluate(trainer.models.world_model, actor, episodes=args.episodes, seed=args.seed + 10_000)
    result = {
        "seed": args.seed,
        "greedy_return": evaluation["greedy_return"],
        "episodes": args.episodes,
        "returns": evaluation["returns"],
        "ball_columns": evaluation["ball_columns"],
        **imagination,
        "agent_steps": counters["steps"],
        "model_updates": counters["updates"],
        "policy_updates": args.policy_updates,
        "world_model_seconds": round(model_seconds, 1),
        "policy_seconds": round(policy_seconds, 1),
        "logdir": str(logdir),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
