"""The device mesh ('data', 'fsdp', 'tensor'), the one logical-axis rules table, and shardings.

Model code names logical axes only; ``LOGICAL_RULES`` maps them to mesh axes. Parameter
shardings are derived once from ``jax.eval_shape`` of the init (no memory allocated),
as in Flax's lm1b example and MaxText. The mesh uses Auto axis types (GSPMD/Shardy
propagation from the in/out shardings and the logical constraints in the model), which
is what Linen's ``with_logical_constraint`` is written for; Explicit axes would need
sharding-in-types annotations throughout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes). Where a mesh axis is already taken by an earlier
# dimension of the same array, Flax falls through to the next rule for that logical name.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),  # activations' model dim: replicated, the batch carries fsdp
    ("embed", "fsdp"),  # parameters' model dim: fully sharded data parallel
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),  # the stacked (scanned) layer axis of block parameters: never sharded
)


def make_mesh(config: MeshConfig | None = None, devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: all devices, all hosts)."""
    config = config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    shape = config.shape(len(devices))
    try:
        array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # odd device counts on CPU: plain reshape is fine there
        array = np.asarray(devices).reshape(shape)
    return Mesh(array, MESH_AXES)  # Auto axis types (see module docstring)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_RULES) -> Iterator[None]:
    """Trace/run under ``mesh`` with the logical rules active (for the model's constraints)."""
    set_mesh = getattr(jax, "set_mesh", None)  # jax >= 0.7; `with mesh:` before that
    with set_mesh(mesh) if set_mesh is not None else mesh, nn.logical_axis_rules(rules):
        yield


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def param_shardings(init_fn: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Shardings of the (unboxed) tree ``init_fn()`` returns, from its logical annotations.

    ``init_fn`` is traced with ``jax.eval_shape``: nothing is allocated. Leaves without a
    logical annotation (step counters, scalars) are replicated.
    """
    abstract = jax.eval_shape(init_fn)
    logical = nn.get_partition_spec(abstract)
    return logical_to_sharding(logical, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch (dict of numpy arrays, global on every host) on the mesh, batch-sharded.

    On several hosts each host passes the same global batch description and
    ``jax.make_array_from_process_local_data`` assembles the global array from the
    local rows (see ``host_local_to_global``).
    """
    if jax.process_count() > 1:
        return host_local_to_global(batch, mesh)
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), batch)


def host_local_to_global(local_batch: Any, mesh: Mesh) -> Any:
    """Assemble global arrays from each host's slice of the batch (multi-host data loading)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)),
        local_batch,
    )


def initialize_distributed(**kwargs: Any) -> None:
    """``jax.distributed.initialize()`` once per process on multi-host TPU/GPU clusters.

    Call it first, before any other jax call. On TPU VMs and SLURM/GPU clusters the
    coordinator address and process ids are found from the environment; pass them
    explicitly otherwise. On a single host without a cluster environment it is a no-op
    (JAX finds no coordinator and raises ValueError). A cluster that is found but cannot be
    joined (RuntimeError: coordinator unreachable, timeout) is an error, as is any failure
    with explicit arguments: each host training alone would be silently wrong.
    """
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError:
        if kwargs:  # the caller asked for a specific cluster
            raise


def shard_state(
    init_fn: Callable[[Any], Any], boxed_init_fn: Callable[[], Any], params: Any, mesh: Mesh
) -> tuple[Any, Any]:
    """Build a state from ``params`` directly into its shardings.

    Args:
      init_fn: ``params -> state`` (pure; e.g. ``optim.init_train_state`` with an optimizer).
      boxed_init_fn: ``() -> state`` built from the model's *boxed* (logically annotated)
        init; traced with ``jax.eval_shape`` only, to derive the shardings of every leaf,
        optimizer moments included.
      params: the starting parameters (host or device arrays).
      mesh: the device mesh.

    Returns:
      (state, state_shardings).
    """
    shardings = param_shardings(boxed_init_fn, mesh)
    with use_mesh(mesh):
        state = jax.jit(init_fn, out_shardings=shardings)(params)
    return state, shardings
