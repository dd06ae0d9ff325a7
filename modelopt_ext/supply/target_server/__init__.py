"""serve_target: the transformers target server (request handler, HTTP plumbing, NCCL/gloo data plane).

See docs/target-server.md. The trainer-side client is `modelopt_ext.supply.target_server.source.RemoteTargetClient`.
"""
