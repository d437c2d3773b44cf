"""Regenerate clients/pb from proto/ with grpcio-tools.

The generated modules are committed so that a GPU image with grpcio and protobuf but no
grpcio-tools can import them. Two edits make them portable across runtime versions:
imports become package-relative, and the generator's exact-version guards are dropped
(the serialized descriptor and the builder API they use are stable across protobuf 4-7
and grpcio >= 1.62).
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "proto" / "loraserve" / "v1"
OUT = ROOT / "clients" / "pb"


def generate(out: pathlib.Path = OUT) -> list[pathlib.Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.name) for p in SRC.glob("*.proto"))
    rc = protoc.main(["protoc", f"-I{SRC}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", *protos])
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    written = []
    for path in sorted(out.glob("*_pb2*.py*")):
        text = path.read_text()
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        # protobuf >= 5 gencode pins the runtime: drop the guard, keep the descriptor.
        text = re.sub(r"from google\.protobuf import runtime_version as _runtime_version\n", "", text)
        text = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", text, flags=re.S)
        # grpcio-tools pins grpcio >= its own version: drop that guard too.
        text = re.sub(r"\nGRPC_GENERATED_VERSION = .*?\n(?=class |\Z)", "\n\n", text, flags=re.S)
        path.write_text(text)
        written.append(path)
    (out / "__init__.py").write_text('"""Generated from proto/ by scripts/gen_proto.py; do not edit."""\n')
    return written


if __name__ == "__main__":
    for p in generate():
        print(p.relative_to(ROOT))
