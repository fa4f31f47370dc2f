"""Where a process sits, as each launcher's environment says."""

from __future__ import annotations

from dsft.distributed import export_local_world_size, topology


def test_torchrun_environment():
    t = topology({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (t.rank, t.local_rank, t.world_size, t.local_world_size, t.num_nodes) == (3, 1, 4, 2, 2)


def test_deepspeed_launcher_local_size_is_exported_before_accelerate_overwrites_it():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}
    assert topology(env).local_world_size == 2
    export_local_world_size(env)
    assert env["LOCAL_WORLD_SIZE"] == "2"
    env_torchrun = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_SIZE": "4"}
    export_local_world_size(env_torchrun)  # an existing LOCAL_WORLD_SIZE is the launcher's own: kept
    assert env_torchrun["LOCAL_WORLD_SIZE"] == "2"


def test_single_process_defaults():
    t = topology({})
    assert (t.rank, t.world_size, t.local_world_size, t.num_nodes) == (0, 1, 1, 1)
