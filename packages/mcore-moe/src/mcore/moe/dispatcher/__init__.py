"""Token dispatchers: move routed tokens to the ranks of their experts and back."""

from mcore.moe.dispatcher.base import DispatchOutput, TokenDispatcher

__all__ = ["DispatchOutput", "TokenDispatcher"]
