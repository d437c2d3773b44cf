from tests.services import fresh_redis, redis_namespace, redis_server, s3_bucket, s3_server  # noqa: F401
