"""Store errors that carry their gRPC status code; the servicer turns them into statuses."""
from __future__ import annotations

import grpc


class StoreError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(StoreError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StoreError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StoreError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(StoreError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(StoreError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(StoreError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Aborted(StoreError):
    code = grpc.StatusCode.ABORTED


class DataLoss(StoreError):
    code = grpc.StatusCode.DATA_LOSS
