"""The data-parallel coordinator: a ZMQ ROUTER between clients and engine ranks (msgpack)."""
