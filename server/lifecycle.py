"""The server's one lifecycle state machine: every health and readiness answer is read from it.

::

    starting ──► serving ⇄ loading          (a new version loads beside the serving one)
        │          │  ▲        │
        │          ▼  │        ▼
        │        unloaded ◄────┘             (RepositoryModelUnload; a load brings it back)
        ▼          │
    draining ◄─────┴── (any live state, on SIGTERM/SIGINT) ──► stopped
    failed   ◄──────── (any state: the batcher or the model process died)

``grpc.health.v1`` (overall and per service), v2 ``ServerReady``/``ModelReady``,
``/v2/health/ready``, the ``ready`` gauge and the admission layer's readiness gate all ask
:class:`Lifecycle`; listeners hear of every change, so nothing keeps a copy of its own.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from .errors import Unavailable

__all__ = ["Lifecycle", "State", "TransitionError"]

logger = logging.getLogger(__name__)


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    LOADING = "loading"
    UNLOADED = "unloaded"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


_LIVE = {State.STARTING, State.SERVING, State.LOADING, State.UNLOADED}
_ALLOWED: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.SERVING, State.DRAINING, State.FAILED, State.STOPPED}),
    State.SERVING: frozenset({State.LOADING, State.UNLOADED, State.DRAINING, State.FAILED}),
    State.LOADING: frozenset({State.SERVING, State.UNLOADED, State.DRAINING, State.FAILED}),
    State.UNLOADED: frozenset({State.LOADING, State.SERVING, State.DRAINING, State.FAILED}),
    State.DRAINING: frozenset({State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.DRAINING, State.STOPPED}),
    State.STOPPED: frozenset(),
}


class TransitionError(RuntimeError):
    """A transition the machine does not have: a bug in the caller, never a caller's request."""


Listener = Callable[["Lifecycle"], None]


class Lifecycle:
    """Where the server is in its life, why, and whether a model version answers meanwhile.

    ``LOADING`` comes in two kinds: a hot swap (the old version answers until the new one is
    swapped in) and a load after an unload (nothing answers until it is done);
    :attr:`model_answers` tells them apart.
    """

    def __init__(self) -> None:
        self.state = State.STARTING
        self.reason = ""
        self._answers_while_loading = False
        self._listeners: list[Listener] = []

    # ------------------------------------------------------------------ reading

    @property
    def ready(self) -> bool:
        """Inference is taken: health SERVING, v2 ready true, the ready gauge 1."""
        return self.state is State.SERVING or (self.state is State.LOADING and self._answers_while_loading)

    @property
    def live(self) -> bool:
        return self.state in _LIVE

    def check(self) -> None:
        """Raise :class:`Unavailable` (retryable) unless inference is taken, saying why."""
        if self.ready:
            return
        state = self.state
        if state is State.STARTING:
            # A worker whose model process restarts says so in its reason.
            raise Unavailable(self.reason or "warming up: the model is loading; retry shortly")
        if state is State.LOADING:
            raise Unavailable("the model is loading after an unload; retry shortly")
        if state is State.UNLOADED:
            raise Unavailable("the model is unloaded; load it again with RepositoryModelLoad")
        if state in (State.DRAINING, State.STOPPED):
            raise Unavailable("shutting down: not taking new calls; use another replica")
        raise Unavailable(f"server failed ({self.reason}); it is exiting")

    # ------------------------------------------------------------------ changing

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(self)`` now and after every change."""
        self._listeners.append(listener)
        listener(self)

    def unsubscribe(self, listener: Listener) -> None:
        """Stop calling ``listener`` (one that lives shorter than the server: a stream)."""
        self._listeners.remove(listener)

    def to(self, state: State, reason: str = "") -> bool:
        """Move to ``state``; False (and nothing changes) where the machine has no such edge.

        Racing events are normal (a load finishing while the server drains): the later one
        loses, and the caller learns it did.
        """
        if state is self.state:
            if reason != self.reason:
                self.reason = reason
                self._notify()
            return True
        if state not in _ALLOWED[self.state]:
            logger.debug("lifecycle: %s -> %s refused", self.state.value, state.value)
            return False
        if state is State.LOADING:
            self._answers_while_loading = self.state is State.SERVING
        logger.debug("lifecycle: %s -> %s %s", self.state.value, state.value, reason)
        self.state = state
        self.reason = reason
        self._notify()
        return True

    def require(self, state: State, reason: str = "") -> None:
        """As :meth:`to`, for transitions that cannot race: a refusal is a bug."""
        before = self.state
        if not self.to(state, reason):
            raise TransitionError(f"lifecycle: no transition from {before.value} to {state.value}")

    def mirror(self, state: State, reason: str, answers_while_loading: bool) -> None:
        """Take on another process's state as it is (a worker mirroring the model process),
        unless this process is already on its way out."""
        if self.state in (State.DRAINING, State.STOPPED, State.FAILED) or (
            state is self.state and reason == self.reason
        ):
            return
        self.state = state
        self.reason = reason
        self._answers_while_loading = answers_while_loading
        self._notify()

    @property
    def answers_while_loading(self) -> bool:
        return self._answers_while_loading

    def _notify(self) -> None:
        for listener in self._listeners:
            listener(self)
