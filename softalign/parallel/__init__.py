"""Devices: the (data, fsdp) mesh and the state's shardings (``sharding``), multi-process start-up
(``distributed``)."""
