"""loraserve's control plane: the AdapterStore service (Redis metadata, object-storage blobs).

Modules (import what you need; only validate/synthetic/service pull in torch):
  services   private redis-server / SeaweedFS S3 child processes (tests, `loraserve serve`)
  objstore   FileStore / S3Store / open_store(url, data_dir)
  metadata   Metadata (records, listing, base models, heartbeats, events), subscribe_events
  validate   upload validation (reuses server/lora.py), Limits, BaseDims
  synthetic  deterministic synthetic adapters from a SyntheticSpec
  service    AdapterStoreServicer, build_store(redis_url, object_store, data_dir, token)
  client     StoreClient (blocking), AdapterNotFound, StoreUnavailable
  main       add_store_args(parser), run_store(args), start_store_server(servicer, port)
"""
