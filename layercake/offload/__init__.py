"""Offloading: run a model larger than memory under a placement policy (``policy``): the
executor (``executor``) interprets the zig-zag schedule (``schedule``) over weights placed in
tiers (``placement``, ``store``, ``loader``), the KV cache in tiers (``kvtiers``, ``kvdisk``)
and memory figures from ``footprint``; ``auto`` plans a policy from measured rates. Runners are
built by ``layercake.runners``."""
