"""The cluster description that placement reads: machines, nodes, network and the model.

A cluster file names machine types (GPU type and count per machine, memory, NIC, price), how many
nodes of each type sit in which region, the network between them (a default link, per-region and
cross-region links, explicit overrides) and the model(s) to place (layers, bytes per layer, KV and
activation bytes per token). Per (machine, model) calibration -- how many layers fit, the measured
per-layer times, the memory the serving engine really leaves for weights and KV -- sits under the
machine type, because it is a fact about that pair and nothing else.

Bandwidth units: ``gb_s`` is 1e9 *bytes*/s, ``gbps`` is 1e9 *bits*/s. Helix's simulator counts
"1 Gbps" as 1e9 bytes/s, so the Helix reference clusters give its figures as ``gb_s`` to compare
like with like (see examples/clusters/*.yaml).
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, model_validator

from optimizer import input_limits as lim
from optimizer.fleet import Accelerator, ModelSpec
from optimizer.problem import InputError, format_validation_error, read_document
from optimizer.profile import PerformanceProfile, TabulatedProfile

GB = 1e9


class _Strict(BaseModel):
    model_config = lim.STRICT


class Bandwidth(_Strict):
    """A link or NIC speed, given in exactly one unit, and its one-way latency."""

    gb_s: float | None = Field(default=None, gt=0, le=lim.MAX_BANDWIDTH_GB_S, description="1e9 bytes per second.")
    gbps: float | None = Field(default=None, gt=0, le=lim.MAX_BANDWIDTH_GBPS, description="1e9 bits per second.")
    latency_ms: float = Field(default=0.0, ge=0, le=lim.MAX_LATENCY_MS)

    @model_validator(mode="after")
    def _one_unit(self) -> Bandwidth:
        if (self.gb_s is None) == (self.gbps is None):
            raise ValueError("give the bandwidth as exactly one of gb_s (bytes) or gbps (bits)")
        return self

    @property
    def bytes_per_s(self) -> float:
        return self.gb_s * GB if self.gb_s is not None else self.gbps * GB / 8

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1000.0

    def scaled(self, factor: float) -> Bandwidth:
        """The same link `factor` times as fast (for bandwidth sweeps)."""
        if self.gb_s is not None:
            return self.model_copy(update={"gb_s": self.gb_s * factor})
        return self.model_copy(update={"gbps": self.gbps * factor})


class ModelDescription(_Strict):
    """What placement needs to know of a model: its layers and the bytes they move and hold."""

    name: str = Field(min_length=1)
    num_layers: int = Field(gt=0, le=lim.MAX_LAYERS)
    layer_weight_gb: float = Field(
        gt=0, le=lim.MAX_WEIGHT_GB, description="Weights of one transformer layer, GB (1e9 bytes)."
    )
    weight_gb: float | None = Field(
        default=None, gt=0, le=lim.MAX_WEIGHT_GB, description="Whole model; default layers x layer weight."
    )
    kv_bytes_per_token_layer: float = Field(
        gt=0, le=lim.MAX_BYTES_PER_TOKEN, description="KV-cache bytes of one token in one layer."
    )
    activation_bytes_per_token: float = Field(
        gt=0, le=lim.MAX_BYTES_PER_TOKEN, description="Hidden state sent between pipeline stages."
    )
    token_bytes: float = Field(
        default=2.0, gt=0, le=lim.MAX_BYTES_PER_TOKEN, description="A token id as sent to the first stage."
    )
    profile_dir: str | None = Field(
        default=None, description="Folder of this model's measured per-layer profiles under --profiles ROOT.")

    @model_validator(mode="after")
    def _whole_model(self) -> ModelDescription:
        if self.total_weight_gb > lim.MAX_WEIGHT_GB:
            raise ValueError(f"the whole model weighs {self.total_weight_gb:g} GB, more than {lim.MAX_WEIGHT_GB:g}")
        if self.kv_bytes_per_token > lim.MAX_BYTES_PER_TOKEN:
            raise ValueError(f"KV bytes per token of all layers ({self.kv_bytes_per_token:g}) exceed "
                             f"{lim.MAX_BYTES_PER_TOKEN:g}")
        return self

    @property
    def total_weight_gb(self) -> float:
        return self.weight_gb if self.weight_gb is not None else self.num_layers * self.layer_weight_gb

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes_per_token_layer * self.num_layers

    def model_spec(self) -> ModelSpec:
        return ModelSpec(name=self.name, weight_gb=self.total_weight_gb, kv_bytes_per_token=self.kv_bytes_per_token,
                         num_layers=self.num_layers)


class MachineCalibration(_Strict):
    """Facts about one model on one machine type; every field may be left to its default rule."""

    max_layers: int | None = Field(
        default=None, gt=0, le=lim.MAX_LAYERS, description="Default: half the machine memory / layer weight."
    )
    typical_layers: int | None = Field(
        default=None, gt=0, le=lim.MAX_LAYERS,
        description="Layers a node usually holds (Helix's batch estimate); default 2/3 of max.")
    relative_speed: float | None = Field(
        default=None, gt=0, le=lim.MAX_RELATIVE_SPEED,
        description="Starting guess of layers x tokens/s for Helix's fixed-point estimate.")
    usable_memory_gb: float | None = Field(
        default=None, gt=0, le=lim.MAX_MEMORY_GB * lim.MAX_GPUS_PER_MACHINE,
        description="Memory the engine leaves for weights + KV; default 85 % of the machine's.")
    layer_memory_gb: float | None = Field(
        default=None, gt=0, le=lim.MAX_WEIGHT_GB,
        description="Memory one layer's weights take on this machine; default the model's.")
    profile_dir: str | None = Field(default=None, description="Folder of measured per-layer times under the model's.")
    layer_profile: PerformanceProfile | None = Field(
        default=None, description="Per-layer times as a profile (seconds for ONE layer), used without --profiles.")


class MachineType(_Strict):
    """One kind of machine: its GPUs, memory, network card and price."""

    name: str = Field(min_length=1)
    accelerator: str = Field(min_length=1, description="GPU type, e.g. A100-40G; variants use this name.")
    gpus: int = Field(default=1, gt=0, le=lim.MAX_GPUS_PER_MACHINE, description="GPUs in one machine.")
    gpu_memory_gb: float = Field(gt=0, le=lim.MAX_MEMORY_GB, description="Memory of one GPU, GB.")
    cost_per_hour: float = Field(
        default=0.0, ge=0, le=lim.MAX_PRICE_PER_HOUR, description="Price of the whole machine for one hour."
    )
    nic: Bandwidth = Field(description="Network card, each direction.")
    intra_node: Bandwidth = Field(
        default=Bandwidth(gb_s=16.0), description="GPU-to-GPU inside the machine (PCIe 4 x16 by default).")
    models: dict[str, MachineCalibration] = Field(default_factory=dict)

    @property
    def memory_gb(self) -> float:
        return self.gpus * self.gpu_memory_gb

    @property
    def cost_per_gpu_hour(self) -> float:
        return self.cost_per_hour / self.gpus

    def calibration(self, model: str) -> MachineCalibration:
        return self.models.get(model, MachineCalibration())

    def accelerator_entry(self, available: int | None = None) -> Accelerator:
        return Accelerator(name=self.accelerator, memory_gb=self.gpu_memory_gb,
                           cost_per_hour=self.cost_per_gpu_hour, available=available)


class NodeGroupSpec(_Strict):
    type: str = Field(min_length=1, description="Name of a machine type.")
    count: int = Field(gt=0, le=lim.MAX_CLUSTER_NODES)
    region: str | None = None
    prefix: str | None = Field(default=None, description="Node names are <prefix>-<i>; default the type in lower case.")


class RegionSpec(_Strict):
    name: str = Field(min_length=1)
    intra: Bandwidth | None = Field(default=None, description="Links inside the region; default network.default.")


class LinkSpec(_Strict):
    """An explicit link between two nodes, or between every node of two regions (symmetric)."""

    a: str = Field(min_length=1)
    b: str = Field(min_length=1)
    bandwidth: Bandwidth


class NetworkSpec(_Strict):
    default: Bandwidth = Field(description="Any two nodes not covered by a more specific rule.")
    regions: list[RegionSpec] = Field(default_factory=list)
    cross_region: Bandwidth | None = Field(default=None, description="Between nodes of different regions.")
    links: list[LinkSpec] = Field(default_factory=list)
    coordinator_nic: Bandwidth = Field(
        default=Bandwidth(gb_s=10.0), description="NIC of the request coordinator (flow source and sink).")
    coordinator_link: Bandwidth | None = Field(
        default=None, description="Coordinator <-> node links; default network.default.")


class ThroughputSettings(_Strict):
    """Constants of Helix's node-throughput model (its defaults, so figures compare like with like)."""

    avg_input_tokens: int = Field(default=750, gt=0, le=lim.MAX_TOKENS)
    avg_output_tokens: int = Field(default=240, gt=0, le=lim.MAX_TOKENS)
    kv_high_water: float = Field(default=0.3, gt=0, le=1, description="Share of KV cache a node plans to fill.")
    kv_block_tokens: int = Field(
        default=16, gt=0, le=lim.MAX_TOKENS, description="vLLM block size; capacity is whole blocks."
    )
    iterations: int = Field(default=10, gt=0, le=1000, description="Rounds of the speed fixed-point estimate.")
    dense_factor: float = Field(
        default=1.2, gt=0, le=lim.MAX_LAYERS,
        description="Use max_layers as typical when typical capacity < factor x layers.")


class ClusterSpec(_Strict):
    """The whole cluster file."""

    name: str = Field(min_length=1)
    description: str = ""
    models: list[ModelDescription] = Field(min_length=1)
    machine_types: list[MachineType] = Field(min_length=1)
    nodes: list[NodeGroupSpec] = Field(min_length=1)
    network: NetworkSpec
    throughput_model: ThroughputSettings = Field(default_factory=ThroughputSettings)

    @model_validator(mode="after")
    def _references(self) -> ClusterSpec:
        for field, names in (("models", [m.name for m in self.models]),
                             ("machine_types", [t.name for t in self.machine_types]),
                             ("network.regions", [r.name for r in self.network.regions])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{field}: duplicate name(s) {dupes}")
        types = {t.name for t in self.machine_types}
        models = {m.name for m in self.models}
        regions = {r.name for r in self.network.regions}
        for i, t in enumerate(self.machine_types):
            unknown = sorted(set(t.models) - models)
            if unknown:
                raise ValueError(f"machine_types[{i}].models: unknown model(s) {unknown} (known: {sorted(models)})")
        for i, g in enumerate(self.nodes):
            if g.type not in types:
                raise ValueError(f"nodes[{i}].type: unknown machine type {g.type!r} (known: {sorted(types)})")
            if g.region is not None and g.region not in regions:
                raise ValueError(f"nodes[{i}].region: unknown region {g.region!r} (known: {sorted(regions)})")
        total = sum(g.count for g in self.nodes)
        if total > lim.MAX_CLUSTER_NODES:
            raise ValueError(f"nodes: {total} nodes in all, more than placement handles ({lim.MAX_CLUSTER_NODES})")
        gpus = {t.name: t.gpus for t in self.machine_types}
        total = sum(g.count * gpus[g.type] for g in self.nodes)
        if total > lim.MAX_CLUSTER_GPUS:
            raise ValueError(f"nodes: {total} GPUs in all, more than placement handles ({lim.MAX_CLUSTER_GPUS})")
        layers = {m.name: m.num_layers for m in self.models}
        for i, t in enumerate(self.machine_types):
            for name, calib in t.models.items():
                slowest = _slowest_layer_s(calib.layer_profile)
                if slowest * layers[name] > lim.MAX_PROFILE_TIME_S:
                    raise ValueError(f"machine_types[{i}].models.{name}.layer_profile: {layers[name]} layers of "
                                     f"{slowest:g} s take more than {lim.MAX_PROFILE_TIME_S:g} s")
        names = _node_names(self)
        dupes = sorted(n for n, k in Counter(names).items() if k > 1)
        if dupes:
            raise ValueError(f"nodes: duplicate node name(s) {dupes[:5]}; give each group its own prefix")
        known = set(names) | regions
        for i, link in enumerate(self.network.links):
            for end in ("a", "b"):
                if getattr(link, end) not in known:
                    raise ValueError(f"network.links[{i}].{end}: unknown node or region {getattr(link, end)!r}")
        return self


def _slowest_layer_s(profile: PerformanceProfile | None) -> float:
    """The largest time or time coefficient of a per-layer profile (0 without one)."""
    if profile is None:
        return 0.0
    if isinstance(profile, TabulatedProfile):
        return max([p.time_s for p in profile.decode_points + profile.prefill_points] + [profile.decode_per_kv_token_s])
    return max(v for k, v in profile.model_dump().items() if k.endswith("_s"))


def _node_names(spec: ClusterSpec) -> list[str]:
    names, seen = [], {}
    for g in spec.nodes:
        prefix = g.prefix or g.type.lower()
        start = seen.get(prefix, 0)
        names += [f"{prefix}-{start + i}" for i in range(g.count)]
        seen[prefix] = start + g.count
    return names


class Node(_Strict):
    """One concrete machine of the cluster."""

    index: int
    name: str
    machine: MachineType
    region: str | None


class Cluster:
    """A validated cluster with its nodes expanded and link lookups answered.

    Link resolution, most specific first: an explicit node-node link, an explicit region-region
    link, the region's own links (both ends in one region), ``cross_region``, ``default``.
    """

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        types = {t.name: t for t in spec.machine_types}
        names = iter(_node_names(spec))
        nodes: list[Node] = []
        for g in spec.nodes:
            for _ in range(g.count):
                nodes.append(Node(index=len(nodes), name=next(names), machine=types[g.type], region=g.region))
        self.nodes: list[Node] = nodes
        self._regions = {r.name: r for r in spec.network.regions}
        self._explicit = {}
        for link in spec.network.links:
            self._explicit[(link.a, link.b)] = link.bandwidth
            self._explicit[(link.b, link.a)] = link.bandwidth

    @property
    def name(self) -> str:
        return self.spec.name

    def machine_type(self, name: str) -> MachineType:
        return next(t for t in self.spec.machine_types if t.name == name)

    def model(self, name: str | None = None) -> ModelDescription:
        """The named model, or the first one when no name is given."""
        if name is None:
            return self.spec.models[0]
        for m in self.spec.models:
            if m.name == name:
                return m
        raise InputError(self.spec.name, "models", f"no model {name!r} (known: {[m.name for m in self.spec.models]})")

    def node(self, name: str) -> Node:
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def link(self, a: Node, b: Node) -> Bandwidth:
        """The link between two different nodes."""
        if a.index == b.index:
            return a.machine.intra_node
        net = self.spec.network
        explicit = self._explicit.get((a.name, b.name))
        if explicit is None and a.region and b.region:
            explicit = self._explicit.get((a.region, b.region))
        if explicit is not None:
            return explicit
        if a.region is not None and a.region == b.region:
            return self._regions[a.region].intra or net.default
        if a.region is not None and b.region is not None and net.cross_region is not None:
            return net.cross_region
        return net.default

    def coordinator_link(self) -> Bandwidth:
        return self.spec.network.coordinator_link or self.spec.network.default

    def counts_by_type(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.machine.name] = counts.get(n.machine.name, 0) + 1
        return counts

    def with_bandwidth_factor(self, factor: float) -> Cluster:
        """The same cluster with every inter-node link `factor` times as fast (NICs unchanged)."""
        net = self.spec.network
        scaled = net.model_copy(update={
            "default": net.default.scaled(factor),
            "cross_region": net.cross_region.scaled(factor) if net.cross_region else None,
            "regions": [r.model_copy(update={"intra": r.intra.scaled(factor) if r.intra else None})
                        for r in net.regions],
            "links": [lk.model_copy(update={"bandwidth": lk.bandwidth.scaled(factor)}) for lk in net.links],
        })
        return Cluster(self.spec.model_copy(update={"network": scaled}))


def load_cluster(path: str | Path) -> Cluster:
    """Read a cluster file (YAML or JSON); any problem becomes one InputError naming file and field."""
    data = read_document(path)
    try:
        return Cluster(ClusterSpec.model_validate(data))
    except ValidationError as err:
        field, reason = format_validation_error(err)[0]
        more = len(err.errors()) - 1
        if more:
            reason += f" (and {more} more error{'s' if more > 1 else ''})"
        raise InputError(str(path), field, reason) from None
