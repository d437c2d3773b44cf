# loraserve engine: the GPU data plane (`loraserve serve`).
# The PyTorch CUDA image already ships torch (and CUDA/cuDNN); pip keeps that torch because it
# satisfies pyproject's torch>=2.4, and adds grpc, redis, boto3, safetensors, tokenizers, triton.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LORASERVE_HOST=0.0.0.0 LORASERVE_PORT=50051 LORASERVE_DATA_DIR=/data

WORKDIR /app
# dependencies first (cached unless pyproject changes)
COPY pyproject.toml README.md* ./
RUN mkdir -p server adapter_store kernels clients && \
    touch server/__init__.py adapter_store/__init__.py kernels/__init__.py clients/__init__.py && \
    pip install ".[triton]" && pip uninstall -y loraserve
COPY server/ server/
COPY adapter_store/ adapter_store/
COPY kernels/ kernels/
COPY clients/ clients/
RUN pip install --no-deps . && python -c "import torch, grpc, clients.cli, server.app; print('torch', torch.__version__)"

RUN mkdir -p /data /models
VOLUME ["/data"]
EXPOSE 50051

HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=5 \
    CMD loraserve --target localhost:50051 --timeout 4 health || exit 1

ENTRYPOINT ["loraserve"]
CMD ["serve"]
