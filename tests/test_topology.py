"""Where a process sits, as each launcher's environment says."""

from __future__ import annotations

import pytest

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


# --------------------------------------------------------------------------------------------------
# node rank: from the launcher / Slurm, never from the host name (issue 14: two nodes on one host both said 0)

def _two_nodes_one_rank_each(launcher: str) -> list[dict]:
    """The environment of rank 0 and rank 1 of a 2-node job with one rank per node, as each launcher sets it.
    Both share one host name (several slurmd on one host) and the Slurm variables of their own Slurm task."""
    envs = []
    for node in (0, 1):
        env = {"HOSTNAME": "vm", "SLURMD_NODENAME": f"n{node + 1}", "SLURM_JOB_NUM_NODES": "2",
               "RANK": str(node), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
        if launcher == "torchrun":  # srun starts one agent per node; the c10d rendezvous numbers the agents
            env.update(LOCAL_WORLD_SIZE="1", GROUP_RANK=str(node), SLURM_NODEID=str(node))
        elif launcher == "deepspeed":  # srun starts one launcher per node with --node_rank=$SLURM_NODEID
            env.update(LOCAL_SIZE="1", CROSS_RANK=str(node), SLURM_NODEID=str(node))
        else:  # submitit: one Slurm task per rank (TorchDistributedEnvironment exports RANK ... LOCAL_WORLD_SIZE)
            env.update(LOCAL_WORLD_SIZE="1", SLURM_NODEID=str(node), SLURM_PROCID=str(node))
        envs.append(env)
    return envs


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "submitit"])
def test_node_rank_comes_from_the_launcher_not_the_shared_host_name(launcher):
    topos = [topology(env) for env in _two_nodes_one_rank_each(launcher)]
    assert [t.node_rank for t in topos] == [0, 1]
    assert {t.local_world_size for t in topos} == {1} and {t.num_nodes for t in topos} == {2}


def test_the_launchers_node_rank_wins_over_slurms():
    # torchrun's c10d rendezvous may number the agents differently from Slurm: RANK is counted from GROUP_RANK
    env = {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "SLURM_NODEID": "0"}
    assert topology(env).node_rank == 1
    assert topology({**env, "GROUP_RANK": ""}).node_rank == 0  # an empty variable is not a value: next one


def test_without_a_node_rank_variable_ranks_are_counted_node_by_node():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert topology(env).node_rank == 1
    assert topology({}).node_rank == 0


def test_rank_info_reports_the_topologys_node_rank():
    from dsft.train import rank_info

    infos = [rank_info(topology(env), threads=1) for env in _two_nodes_one_rank_each("submitit")]
    assert [(i["rank"], i["node_rank"], i["ranks_per_node"]) for i in infos] == [(0, 0, 1), (1, 1, 1)]


def _reported(topos):
    return [{"rank": t.rank, "local_rank": t.local_rank, "node_rank": t.node_rank, "ranks_per_node": t.local_world_size}
            for t in topos]


@pytest.mark.parametrize("nodes,per_node", [(2, 1), (2, 2), (1, 2)])
def test_hpz_auto_is_the_ranks_per_node_on_every_rank(nodes, per_node):
    """zero3_multinode's zero_hpz_partition_size "auto" as each rank resolves it from its own environment
    (torchrun layout): the ranks of its node, on every rank; and the layout check passes."""
    from dsft.deepspeed import fill_dsft_placeholders, load_ds_config

    ds = load_ds_config("zero3_multinode")
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == "auto"
    topos = []
    for rank in range(nodes * per_node):
        env = {"RANK": str(rank), "WORLD_SIZE": str(nodes * per_node), "LOCAL_RANK": str(rank % per_node),
               "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(rank // per_node), "HOSTNAME": "vm"}
        t = topology(env)
        assert fill_dsft_placeholders(ds, t.local_world_size)["zero_optimization"]["zero_hpz_partition_size"] \
            == per_node
        topos.append(t)
    from dsft.distributed import node_layout_problems

    assert node_layout_problems(_reported(topos), per_node) == []


def test_layout_check_names_what_is_wrong():
    from dsft.distributed import node_layout_problems

    # the issue-14 report: both ranks of a 2-node job said node 0
    both_zero = [{"rank": r, "local_rank": 0, "node_rank": 0, "ranks_per_node": 1} for r in (0, 1)]
    problems = node_layout_problems(both_zero)
    assert len(problems) == 1 and "node 0 holds ranks [0, 1] with local ranks [0, 0]" in problems[0]
    good = [{"rank": r, "local_rank": 0, "node_rank": r, "ranks_per_node": 1} for r in (0, 1)]
    assert node_layout_problems(good) == [] and node_layout_problems(good, 1) == []
    assert node_layout_problems(good, 2) == ["zero_hpz_partition_size 2 != 1 ranks per node"]
    gap = [{"rank": r, "local_rank": 0, "node_rank": 2 * r, "ranks_per_node": 1} for r in (0, 1)]
    assert node_layout_problems(gap) == ["node ranks [0, 2] are not 0..1"]
