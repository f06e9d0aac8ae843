"""Multi-node DDP: `opsloop train trainer=ddp` under `torchrun --nnodes 2`, two "nodes" on loopback.

Two torchrun agents (one process each) meet through c10d rendezvous on 127.0.0.1 and train one
model with gloo, as two machines sharing a filesystem for the run directory would
(`OPSLOOP_RUN_DIR`) and a fresh tracking store. A small wrapper around the real CLI saves what
each rank holds when training ends, so the test can check that the ranks agree with each other and
with the checkpoint, and that exactly one tracked run holds that checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.processes import free_port
from tests.support import CONFIG_DIR, REPO_ROOT, prepare_digits

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = 2
TIMEOUT_S = 600
# torchrun runs this script on each node: the real `opsloop` CLI, plus a callback that saves the
# weights each rank holds when fitting ends (DDP keeps them equal by all-reducing gradients).
PROBE = """\
import json, os, sys
from pathlib import Path

import lightning as L
import torch

import opsloop.train as train

OUT = Path(os.environ["PROBE_DIR"])


class SaveRankWeights(L.Callback):
    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(weights, OUT / f"rank{rank}.pt")
        facts = {"world_size": trainer.world_size, "node_rank": trainer.node_rank}
        (OUT / f"rank{rank}.json").write_text(json.dumps(facts))


standard = train.standard_callbacks
train.standard_callbacks = lambda *a, **k: [*standard(*a, **k), SaveRankWeights()]
from opsloop.cli import main

raise SystemExit(main(sys.argv[1:]))
"""


def test_two_torchrun_nodes_train_one_model_into_one_run(tmp_path: Path) -> None:
    import mlflow.artifacts
    import torch
    from mlflow.tracking import MlflowClient

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip(f"torchrun not found at {torchrun}: install the 'train' extra")
    processed = tmp_path / "processed"
    prepare_digits(processed)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    workspace = tmp_path / "workspace"  # one fresh tracking store, as one server would be
    run_dir = tmp_path / "shared" / "run"  # the filesystem both nodes mount
    env = {
        key: value
        for key, value in os.environ.items()
        # A launcher's variables from the surrounding shell would confuse the ranks.
        if key not in {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "OPSLOOP_TRACKING_URI"}
    }
    env |= {
        "OPSLOOP_CONFIG_DIR": str(CONFIG_DIR),
        "OPSLOOP_RUN_DIR": str(run_dir),
        "PROBE_DIR": str(probe_dir),
        "PYTHONPATH": str(REPO_ROOT),
        "GLOO_SOCKET_IFNAME": "lo",  # gloo talks over loopback only
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    port = free_port()
    nodes = []
    for node in range(NODES):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        command = [
            str(torchrun),
            "--nnodes", str(NODES), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "opsloop-multinode", "--local-addr", "127.0.0.1",
            str(probe), "train",
            "trainer=ddp", "trainer.devices=1", f"trainer.num_nodes={NODES}",
            "experiment=tiny", f"workspace={workspace}", f"data.processed_dir={processed}",
            "optim.lr=0.02", "data.batch_size=32", "trainer.max_epochs=3",
        ]  # fmt: skip
        log = (tmp_path / f"node{node}.log").open("w")
        # Its own session: on a timeout the test ends this node's whole process tree, by PID.
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=log, start_new_session=True
        )
        nodes.append((process, log))
    try:
        for process, _ in nodes:
            process.wait(timeout=TIMEOUT_S)
    finally:
        for process, log in nodes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
    logs = [(tmp_path / f"node{node}.log").read_text() for node in range(NODES)]
    for (process, _), log_text in zip(nodes, logs, strict=True):
        assert process.returncode == 0, log_text[-4000:]
    assert sum(text.count("run id") for text in logs) == 1  # only global zero reports

    # Two nodes, one world: each rank knew it was one of two, on its own node.
    facts = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in range(NODES)]
    assert [f["world_size"] for f in facts] == [NODES] * NODES
    assert sorted(f["node_rank"] for f in facts) == list(range(NODES))

    # What every rank holds is the same model, and it is the checkpoint saved at the end.
    ranks = [torch.load(probe_dir / f"rank{r}.pt", weights_only=True) for r in range(NODES)]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for weights in ranks:
        assert weights.keys() == last.keys()
        for key, tensor in last.items():
            assert torch.equal(weights[key], tensor), key

    # One tracked run, from global zero, holding that run's checkpoint byte for byte.
    tracking_uri = f"sqlite:///{workspace / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("opsloop")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.num_nodes"] == str(NODES)
    assert run.data.tags["run_dir"] == str(run_dir.resolve())
    assert 0.3 < run.data.metrics["test/acc"] <= 1.0  # it learned: chance is 0.1
    tracked = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="checkpoints/best.ckpt",
            dst_path=str(tmp_path / "downloaded"),
            tracking_uri=tracking_uri,
        )
    )
    assert tracked.read_bytes() == (run_dir / "checkpoints" / "best.ckpt").read_bytes()
