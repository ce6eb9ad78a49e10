"""Regenerate the checked-in Python stubs from ``generate.proto``: ``python -m latentmoe.proto.gen``.

The stubs are generated from the repository root with ``-I .`` so that the generated imports read
``from latentmoe.proto import generate_pb2``. Byte-identical output needs the pinned grpcio-tools
(its version is recorded in ``generate_pb2_grpc.GRPC_GENERATED_VERSION``); a test regenerates into a
temporary folder and fails if the checked-in files differ.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROTO = "latentmoe/proto/generate.proto"  # relative to the repository root, as protoc sees it
ROOT = Path(__file__).resolve().parents[2]  # the folder that holds latentmoe/
STUBS = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")


def generate(out_dir: Path | str = ROOT) -> list[Path]:
    """Run grpc_tools.protoc on ``generate.proto``; the stubs go to ``out_dir/latentmoe/proto/``."""
    from grpc_tools import protoc  # a build-time tool (the `test` extra), not a runtime dependency

    out_dir = Path(out_dir)
    (out_dir / "latentmoe" / "proto").mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed (exit {rc}): {' '.join(args)}")
    return [out_dir / "latentmoe" / "proto" / name for name in STUBS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT,
                        help="root to write latentmoe/proto/generate_pb2*.py under (default: this checkout)")
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
