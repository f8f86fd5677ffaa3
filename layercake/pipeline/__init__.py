"""Pipelines across hosts: a topology file, ``layercake worker`` on each node, point-to-point
frames over torch.distributed, and ``PipelineRunner`` on rank 0 (see ``pipeline``)."""

from layercake.pipeline.topology import Topology, load_topology

__all__ = ["Topology", "load_topology"]
