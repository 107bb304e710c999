"""Placement on a concrete GPU cluster: which GPUs serve together, in which role, holding which layers.

Two planners share one cluster description (``cluster``):

* ``grouping`` -- HexGen-2-style prefill/decode grouping: GPUs of a type are partitioned into serving
  groups (one replica each, priced by ``serving_groups``), every group gets a role, and the max flow
  source -> P -> KV links -> D -> sink is maximised. Its output is a set of
  ``optimizer.fleet.Variant`` that ``plan`` can size.
* ``layers`` -- Helix-style layer placement for models too large for one machine: contiguous layer
  ranges per node, scored by the max flow of tokens through the node/link graph (``flow_graph``)
  under Helix's own node-throughput model (``throughput``); built by ``stage_chain`` and local
  search, with a proven upper bound (``bounds``, ``layer_milp``).

``ablation`` runs the comparisons the papers left out.
"""
