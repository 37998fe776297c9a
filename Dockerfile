# One image for every Tessera process (API, workers, beat); compose.yaml picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# glibc keeps freed memory for the next CT volume: shared.processes.ALLOCATOR_ENV, which `tessera up` also sets
ENV MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md alembic.ini ./
COPY shared shared
COPY model_runtime model_runtime
COPY services services
COPY migrations migrations
COPY models models
RUN pip install -e .
RUN useradd --create-home tessera && mkdir -p /data && chown tessera /data
USER tessera
ENV TESSERA_DATA_DIR=/data
EXPOSE 8000
CMD ["tessera", "up"]
