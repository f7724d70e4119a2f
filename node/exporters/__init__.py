"""The transports of the outbox (:mod:`node.export`): one module per way of sending a result file to a
destination, each with ``send_files(settings, dest, paths) -> list[SendOutcome]`` (:mod:`.outcome`)."""
