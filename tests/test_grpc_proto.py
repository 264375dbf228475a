"""The checked-in gRPC code is what `make proto` generates from cluster/grpc_gen/aptserve.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

GENERATED = ["aptserve_pb2.py", "aptserve_pb2_grpc.py"]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    proto = Path("cluster/grpc_gen/aptserve.proto")
    (tmp_path / proto.parent).mkdir(parents=True)
    shutil.copy(REPO / proto, tmp_path / proto)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.", str(proto)],
        cwd=tmp_path, check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / proto.parent / name).read_text()
        assert fresh == (REPO / proto.parent / name).read_text(), f"{name} is stale: run `make proto`"


def test_service_has_the_four_rpcs() -> None:
    from cluster.grpc_gen import aptserve_pb2

    service = aptserve_pb2.DESCRIPTOR.services_by_name["AptServe"]
    assert service.full_name == "aptserve.v1.AptServe"
    methods = {m.name: m.server_streaming for m in service.methods}
    assert methods == {"Generate": True, "Abort": False, "Health": False, "ModelInfo": False}
