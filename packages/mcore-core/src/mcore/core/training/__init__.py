"""The training driver: ``mcore train`` and the loop behind it, plus its logging helpers."""
