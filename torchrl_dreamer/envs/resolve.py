"""Bring your own env: resolve what a user passes (a TorchRL env, a factory, a name) and add what DreamerV2 needs.

DreamerV2 needs two things on top of any TorchRL env: an ``"is_init"`` flag (TorchRL's
:class:`~torchrl.envs.InitTracker`), so that the recurrent state is reset at every episode start, and the
acting policy's recurrent-state primer (:meth:`~torchrl_dreamer.modules.DreamerV2Policy.make_tensordict_primer`),
so that collectors carry ``(z, h, a)`` from step to step. :func:`prepare_env` appends whichever is missing.

A user's env arrives in one of three forms, all turned into a picklable :class:`EnvFactory` (worker processes of a
``ParallelEnv`` need a factory, not an instance):

* a :class:`~torchrl.envs.EnvBase` instance (used as is; a single env only);
* a callable that returns one (a function, a ``functools.partial``, a class);
* a string: a :func:`~torchrl_dreamer.envs.make_env` name (``"atari:Pong"``, ``"gym:CartPole-v1"``, ...) or the
  import path of a factory, ``"package.module:function"``.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Union

from torchrl.envs import Compose, EnvBase, InitTracker, Transform, TransformedEnv

from torchrl_dreamer.config import BUILTIN_SUITES
from torchrl_dreamer.envs.factory import SUPPORTED_ENV_NAMES, make_env

__all__ = ["EnvFactory", "EnvLike", "prepare_env", "load_factory"]

EnvLike = Union[str, EnvBase, Callable[[], EnvBase]]


def load_factory(path: str) -> Callable[[], EnvBase]:
    """Imports ``"package.module:function"`` (the current directory is importable) and returns the function.

    Examples:
        >>> load_factory("torchrl_dreamer.envs.catch:CatchEnv").__name__
        'CatchEnv'
    """
    module_name, sep, attr = path.partition(":")
    if not (module_name and sep and attr):
        raise ValueError(f"Expected an env factory as 'package.module:function', got {path!r}.")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import the env factory module {module_name!r} of {path!r}: {err}.") from err
    try:
        factory = getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"Module {module_name!r} has no attribute {attr!r} (env factory {path!r}).") from err
    if not callable(factory):
        raise ValueError(f"The env factory {path!r} is not callable.")
    return factory


def _is_suite_name(name: str) -> bool:
    return name.partition(":")[0] in BUILTIN_SUITES


class EnvFactory:
    """A picklable recipe for a user's env, seeded at each call.

    Args:
        env: a :func:`make_env` name, a ``"package.module:function"`` path, a callable returning an
            :class:`~torchrl.envs.EnvBase`, or an env instance.
        **kwargs: keyword arguments of :func:`make_env` for names (e.g. ``full_action_space=False``); not allowed
            with the other forms.

    Calling it builds the env (an instance is returned as is) and, with ``seed``, seeds it with
    ``env.set_seed(seed)``.

    Examples:
        >>> factory = EnvFactory("catch:8")
        >>> env = factory(seed=0)
        >>> env.batch_size, factory.description
        (torch.Size([]), 'catch:8')
        >>> EnvFactory("torchrl_dreamer.envs.catch:CatchEnv").description
        'torchrl_dreamer.envs.catch:CatchEnv'
    """

    def __init__(self, env: EnvLike, **kwargs: Any) -> None:
        self.instance: EnvBase | None = None
        self.kwargs = kwargs
        if isinstance(env, EnvBase):
            self.instance, self.description, self._fn = env, f"{type(env).__name__} instance", None
        elif isinstance(env, str):
            self.description = env
            # suite names are built by make_env when called (in the worker process for parallel envs)
            self._fn = None if _is_suite_name(env) else load_factory(env)
        elif callable(env):
            self._fn = env
            self.description = _callable_name(env)
        else:
            raise TypeError(
                f"env must be a TorchRL EnvBase, a callable returning one, or a string; got {type(env).__name__}. "
                f"Names: {SUPPORTED_ENV_NAMES}, or 'package.module:function'."
            )
        if kwargs and not (isinstance(env, str) and self._fn is None):
            raise ValueError(f"env keyword arguments {sorted(kwargs)} apply to make_env names only.")
        self._name = env if isinstance(env, str) else None

    @property
    def is_instance(self) -> bool:
        """Whether this factory wraps an existing env instance (it cannot feed several worker processes)."""
        return self.instance is not None

    def __call__(self, seed: int | None = None) -> EnvBase:
        if self.instance is not None:
            env = self.instance
        elif self._fn is None:
            env = make_env(self._name, **self.kwargs)
        else:
            env = self._fn()
            if not isinstance(env, EnvBase):
                raise TypeError(
                    f"The env factory {self.description} returned a {type(env).__name__}, not a TorchRL EnvBase; "
                    "wrap gymnasium envs with torchrl.envs.GymWrapper or GymEnv."
                )
        if seed is not None:
            env.set_seed(seed)
        return env

    def __getstate__(self) -> dict:
        if self.instance is not None:
            raise TypeError(
                "An env instance cannot be sent to worker processes: pass a factory (a function returning the "
                "env) to use several parallel envs."
            )
        return self.__dict__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


def _callable_name(fn: Callable) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    module = getattr(inner, "__module__", None)
    name = getattr(inner, "__qualname__", None) or type(inner).__name__
    return f"{module}:{name}" if module else name


def prepare_env(env: EnvBase, primer: Transform | None = None) -> TransformedEnv:
    """Appends :class:`~torchrl.envs.InitTracker` and the policy's primer when the env lacks them.

    Args:
        env (EnvBase): the user's env (single or batched).
        primer (Transform, optional): the acting policy's recurrent-state primer; skipped when ``None`` or when
            the env already carries its keys.

    Returns: a :class:`~torchrl.envs.TransformedEnv` with ``"is_init"`` (and the primer's keys).

    Examples:
        >>> from torchrl_dreamer.envs import CatchEnv
        >>> env = prepare_env(CatchEnv(size=4))
        >>> "is_init" in env.observation_spec.keys()
        True
        >>> prepare_env(env) is env  # nothing missing: nothing added
        True
    """
    keys = set(env.observation_spec.keys(True, True))
    missing: list[Transform] = []
    if "is_init" not in keys:
        missing.append(InitTracker())
    if primer is not None and not set(primer.primers.keys(True, True)) <= keys:
        missing.append(primer)
    if not missing:
        return env if isinstance(env, TransformedEnv) else TransformedEnv(env)
    if isinstance(env, TransformedEnv):
        for transform in missing:
            env.append_transform(transform)
        return env
    return TransformedEnv(env, Compose(*missing) if len(missing) > 1 else missing[0])
