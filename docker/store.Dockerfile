# loraserve adapter store: the control plane (`loraserve store`), CPU only.
# Validation parses safetensors with torch, so the CPU build of torch is installed (small).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LORASERVE_PORT=50052 LORASERVE_DATA_DIR=/data

WORKDIR /app
RUN pip install torch --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md* ./
RUN mkdir -p server adapter_store kernels clients && \
    touch server/__init__.py adapter_store/__init__.py kernels/__init__.py clients/__init__.py && \
    pip install . && pip uninstall -y loraserve
COPY server/ server/
COPY adapter_store/ adapter_store/
COPY kernels/ kernels/
COPY clients/ clients/
COPY docker/example-register.sh /usr/local/bin/example-register.sh
RUN pip install --no-deps . && chmod +x /usr/local/bin/example-register.sh && \
    python -c "import adapter_store.main, clients.cli"

RUN mkdir -p /data
EXPOSE 50052

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD loraserve --target localhost:50052 --timeout 4 health || exit 1

ENTRYPOINT ["loraserve"]
CMD ["store"]
