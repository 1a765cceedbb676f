"""The Ray executor on a real local cluster of two nodes (CPU only): the same runner on each
node, a node killed in the middle of a job, and the run finishing with every job done once."""

from __future__ import annotations

import os
import threading
import time

import pytest

from evo.config import load_config
from evo.runs import start_run
from evo.store import RunStore
from tests.test_engine import ledger_counts


@pytest.fixture
def ray_cluster():
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        if os.environ.get("EVO_REQUIRE_RAY") == "1":
            pytest.fail("EVO_REQUIRE_RAY=1, but ray is not installed (scripts/test.sh installs evo[ray])")
        pytest.skip("ray is not installed: pip install 'evo[ray]'")
    import ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def _in_flight(ledger) -> int:
    starts, ends = ledger_counts(ledger)
    return sum(starts.values()) - sum(ends.values())


@pytest.mark.slow
def test_a_run_on_a_two_node_cluster_survives_losing_a_node_mid_job(ray_cluster, setup_run, tmp_path):
    cluster, worker = ray_cluster
    # The nodes' data directory starts empty: the first node builds it with the run's settings,
    # and both check it against the run's fingerprint before their first job.
    node_data = tmp_path / "node-data"
    config_path, run_dir, ledger = setup_run(
        max_evaluations=5, sleep=4.0,
        executor={"kind": "ray", "address": cluster.address, "gpus_per_job": 0, "cpus_per_job": 1,
                  "data_dir": str(node_data)})
    lines = []
    engine = start_run(load_config(config_path), config_path, log=lines.append)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("reason", engine.run()))
    runner.start()
    deadline = time.monotonic() + 300
    while _in_flight(ledger) < 2 and time.monotonic() < deadline and runner.is_alive():  # one job on each node
        time.sleep(0.1)
    ledger_text = ledger.read_text() if ledger.exists() else "(no ledger)"
    assert _in_flight(ledger) == 2, ("the cluster never ran two jobs at once", outcome, lines, ledger_text)
    cluster.remove_node(worker, allow_graceful=False)  # the worker node dies with its job
    runner.join(timeout=600)
    assert not runner.is_alive()
    assert "max_evaluations (5)" in outcome["reason"], (outcome, lines)

    individuals, state = RunStore(run_dir).load()
    assert len(individuals) == 5 and all(i.status == "ok" for i in individuals), [(i.id, i.status, i.reason) for i in individuals]
    starts, ends = ledger_counts(ledger)
    assert set(ends.values()) == {1} and set(ends) == {i.id for i in individuals}  # each finished exactly once
    assert sum(starts.values()) == 6  # the job on the dead node started again elsewhere
    for individual in individuals:
        folder = run_dir / "variants" / individual.id
        assert (folder / "result.json").is_file() and (folder / "log.txt").read_text().startswith("[ran on Ray node")
    assert any(line.startswith("ray: 2 node(s)") for line in lines)
    assert (node_data / "meta.json").is_file()  # built on a node, with the run's fingerprint


@pytest.mark.slow
def test_a_node_with_other_data_stops_the_run_naming_the_node(ray_cluster, setup_run, tmp_path):
    import prepare

    cluster, _ = ray_cluster
    other = tmp_path / "other-data"
    prepare.build(prepare.PrepareSettings(vocab_size=300, max_bytes=500_000), other)
    config_path, run_dir, _ = setup_run(
        max_evaluations=2,
        executor={"kind": "ray", "address": cluster.address, "gpus_per_job": 0, "cpus_per_job": 1, "data_dir": str(other)})
    reason = start_run(load_config(config_path), config_path, log=lambda line: None).run()
    assert reason.startswith("stopped, nothing more can be evaluated") and "node " in reason, reason
    assert "is not the run's" in reason and str(other) in reason
    individuals, _ = RunStore(run_dir).load()
    assert [i.status for i in individuals] == ["pending"]  # nothing lost: resume runs it once fixed


@pytest.mark.slow
def test_a_job_no_node_can_hold_is_refused_with_what_the_largest_node_has(ray_cluster, setup_run):
    from evo.executors import ExecutorUnavailable

    cluster, _ = ray_cluster
    config_path, run_dir, _ = setup_run(
        max_evaluations=2, executor={"kind": "ray", "address": cluster.address, "gpus_per_job": 1, "cpus_per_job": 1})
    engine = start_run(load_config(config_path), config_path, log=lambda line: None)
    with pytest.raises(ExecutorUnavailable, match="no node of the Ray cluster can hold one job .1 GPU, 1 CPU.; the largest has 0 GPU"):
        engine.run()
