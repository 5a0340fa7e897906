"""The process group over some dimensions of a DeviceMesh: the ranks that hold a DTensor's other
pieces when two or more mesh dimensions cut it (FSDP2 over tensor parallelism).

``DeviceMesh.get_group(dim)`` gives the group of one dimension; a group over several is either
the whole world (a 2-D ``dp x tp`` mesh of every rank: no new group), or one this module creates
once per process with ``torch.distributed.new_group(ranks, use_local_synchronization=True)``
and keeps: COLLECTIVE over those ranks, which all plan the same DTensor parameters in the same
order (every rank of a DTensor's mesh holds it), so they create it together.
"""

from __future__ import annotations

_created: dict = {}  # ranks -> (the default group it was made under, the group)


def group_over(mesh, mesh_dims: tuple[int, ...]):
    """The process group of this rank's ranks along ``mesh_dims`` of ``mesh`` (the other
    coordinates fixed to this rank's), or None where ``mesh_dims`` is empty. COLLECTIVE over
    those ranks the first time a group of two or more dimensions that is not the whole world
    is needed; it has the backend of the mesh's groups."""
    import torch.distributed as dist

    mesh_dims = tuple(sorted(set(mesh_dims)))
    if not mesh_dims:
        return None
    if len(mesh_dims) == 1:
        return mesh.get_group(mesh_dims[0])
    coordinate = mesh.get_coordinate()
    ranks = mesh.mesh[tuple(slice(None) if m in mesh_dims else c for m, c in enumerate(coordinate))]
    ranks = sorted(ranks.reshape(-1).tolist())
    if ranks == list(range(dist.get_world_size())):
        return dist.group.WORLD
    world = dist.group.WORLD
    made = _created.get(tuple(ranks))
    if made is None or made[0] is not world:  # none yet, or made before the default group was renewed
        backend = dist.get_backend(mesh.get_group(mesh_dims[0]))
        made = (world, dist.new_group(ranks, backend=backend, use_local_synchronization=True))
        _created[tuple(ranks)] = made
    return made[1]
