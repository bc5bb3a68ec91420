"""`embedline serve`: the real tritonserver comes up, answers, and stops with the launcher.

Bad start-ups (a port in use, a broken artifact) are one-line errors, not stack traces.
"""

import shutil
import signal
import socket
import subprocess
import sys

import pytest

import numpy as np
import psutil

from embedline.serving.triton import free_port

EMBEDLINE = [sys.executable, "-m", "embedline.cli"]


def run_cli(*args, timeout=120):
    return subprocess.run([*EMBEDLINE, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, needle):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("embedline serve: error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr


@pytest.mark.processes
def test_port_in_use_is_a_one_line_error(tiny_artifact):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--artifact", str(tiny_artifact.path), "--grpc-port", str(port),
                         "--http-port", str(free_port()), "--metrics-port", str(free_port()))
    assert_one_line_error(result, f"port {port}")


@pytest.mark.processes
def test_broken_artifact_is_a_one_line_error(tmp_path):
    (tmp_path / "embedline.json").write_text("{not json")
    (tmp_path / "tokenizer.json").write_text("{}")
    result = run_cli("serve", "--artifact", str(tmp_path), "--grpc-port", str(free_port()),
                     "--http-port", str(free_port()), "--metrics-port", str(free_port()))
    assert_one_line_error(result, "cannot read JSON")


@pytest.mark.processes
def test_missing_artifact_is_a_one_line_error(tmp_path):
    result = run_cli("serve", "--artifact", str(tmp_path / "nope"), "--grpc-port", str(free_port()),
                     "--http-port", str(free_port()), "--metrics-port", str(free_port()))
    assert_one_line_error(result, "does not exist")


def test_serve_exports_a_fresh_artifact_serves_and_stops_on_sigterm(tiny_artifact, tmp_path, launch_serve):
    import tritonclient.grpc as grpcclient

    artifact_dir = tmp_path / "fresh"  # as a training run leaves it: no onnx/ yet
    shutil.copytree(tiny_artifact.path, artifact_dir)
    served = launch_serve("--artifact", str(artifact_dir))
    assert f"gRPC     127.0.0.1:{served.grpc_port}" in served.banner  # loopback unless --host says otherwise
    assert (artifact_dir / "onnx" / "model.onnx").is_file()
    tritonserver = served.tritonserver()

    client = grpcclient.InferenceServerClient(served.grpc_url)
    texts = np.array([[b"a man plays the guitar"], [b""]], dtype=np.object_)
    request = grpcclient.InferInput("text", texts.shape, "BYTES")
    request.set_data_from_numpy(texts)
    embeddings = client.infer("embed", [request]).as_numpy("sentence_embedding")
    assert embeddings.shape == (2, 32)
    instances = client.get_model_config("embed").config.instance_group[0].count
    assert f"engine   {instances} instance" in served.banner  # the layout the banner names is the one served
    memory = next(line for line in served.banner.splitlines() if line.strip().startswith("memory"))
    assert f"({instances} " in memory and "MiB" in memory  # what its model processes may take
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)

    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    psutil.wait_procs([tritonserver], timeout=30)
    assert not (tritonserver.is_running() and tritonserver.status() != psutil.STATUS_ZOMBIE)
