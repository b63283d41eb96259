"""Declared state machines and the one compare-and-set writer that applies them."""

from core.state.machine import IllegalTransition, StaleTransition, StateMachine, transition, transition_alone

__all__ = ["IllegalTransition", "StaleTransition", "StateMachine", "transition", "transition_alone"]
