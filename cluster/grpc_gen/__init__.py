"""Code generated from aptserve.proto by `make proto` (grpcio-tools): do not edit the *_pb2 files."""
